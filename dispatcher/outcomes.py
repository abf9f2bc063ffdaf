"""What to write when a task ends: the finish.lua item for ack, retry or dead letter.

Pure functions of (task, how it ended, policy, now), so the policy is tested without Redis or
processes, and the dispatcher's loop stays a loop.
"""
from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from dispatcher.codec import Task, encode
from dispatcher.execute import error_reply
from dispatcher.keys import Keys


@dataclass(frozen=True)
class Policy:
    """Retry and reply policy; per-task values come from the payload, then the decorator."""

    max_retries: int
    backoff: float
    backoff_max: float
    result_ttl: int


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random = random._inst) -> float:
    """Exponential with jitter: half fixed, half random, so a burst of failures spreads out."""
    delay = min(cap, base * (2 ** min(attempt, 32)))
    return delay / 2 + rng.uniform(0, delay / 2)


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _reply_targets(task: Task, keys: Keys) -> tuple[str, str]:
    result_key = keys.result(task.id) if task.want_result else ""
    return result_key, task.reply_to or ""


def _with_reply(item: dict[str, Any], task: Task, keys: Keys) -> dict[str, Any]:
    """A reply_to key is the producer's, and may refuse the outcome (a key of another type):
    then finish.lua keeps it under the task's result key instead (and says so)."""
    if item["reply_to"]:
        item["keep_key"] = keys.result(task.id)
    return item


def ack_item(slot: int, task: Task, reply: bytes | None, keys: Keys, policy: Policy) -> dict[str, Any]:
    if not reply:  # nobody asked for the outcome: the slot alone says "done" (finish.lua)
        return {"slot": slot}
    result_key, reply_to = _reply_targets(task, keys)
    return _with_reply({"slot": slot, "action": "ack", "result_key": result_key, "reply_to": reply_to,
                        "reply": reply, "ttl": policy.result_ttl}, task, keys)


def failure_item(slot: int, task: Task, source: str, error: tuple[str, str, str], max_retries: int,
                 keys: Keys, policy: Policy, now: float) -> dict[str, Any]:
    """Retry with backoff while retries are left, else a dead letter plus the error reply."""
    error_type, message, traceback = error
    if task.attempt < max_retries:
        due_ms = int((now + backoff_delay(task.attempt, policy.backoff, policy.backoff_max)) * 1000)
        return {"slot": slot, "action": "retry", "due": due_ms,
                "schedule_key": keys.schedule(keys.priority_of(source)),
                "payload": task.next_attempt().encode()}
    attempts = task.attempt + 1
    message, traceback = _text(message), _text(traceback)
    reply = b""
    result_key, reply_to = _reply_targets(task, keys)
    if result_key or reply_to:
        reply = encode(task.codec, error_reply(task.id, task.name, error_type, message, traceback, attempts))
    fields = {"reason": f"failed {attempts} time(s), no retries left", "task": task.name,
              "task_id": task.id, "error": error_type, "message": message[:10_000],
              "traceback": traceback[-20_000:], "attempts": attempts, "dead_at": iso(now)}
    if task.enqueued_at:
        fields["enqueued_at"] = iso(task.enqueued_at)
    return _with_reply(dead_item(slot, fields, keys, payload=replace(task, attempt=0).encode(),
                                 result_key=result_key, reply_to=reply_to, reply=reply,
                                 ttl=policy.result_ttl), task, keys)


def _text(text: str) -> str:
    """An error's text as Redis can store it: a file name read as surrogate escapes, say, kept
    as backslash escapes rather than failing the whole outcome."""
    return text if text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid_item(slot: int, reason: str, keys: Keys, now: float) -> dict[str, Any]:
    """A malformed element: parked unchanged (the in-flight copy) with the reason and the time."""
    return dead_item(slot, {"reason": reason, "dead_at": iso(now), "attempts": 0}, keys)


def refused_item(slot: int, task: Task, error_type: str, reason: str, keys: Keys, policy: Policy,
                 now: float) -> dict[str, Any]:
    """A task that decoded but cannot run (an unknown name, arguments that do not fit): parked
    unchanged like any malformed element, and whoever waits for its outcome gets the reason at
    once, not at the end of their timeout."""
    result_key, reply_to = _reply_targets(task, keys)
    if keys.owns(reply_to):  # that is why it was refused: write nothing there
        reply_to = ""
    fields = {"reason": reason, "task": task.name, "task_id": task.id, "dead_at": iso(now), "attempts": 0}
    if not (result_key or reply_to):
        return dead_item(slot, fields, keys)
    reply = encode(task.codec, error_reply(task.id, task.name, error_type, reason, "", 0))
    return _with_reply(dead_item(slot, fields, keys, result_key=result_key, reply_to=reply_to, reply=reply,
                                 ttl=policy.result_ttl), task, keys)


def dead_item(slot: int, fields: dict[str, Any], keys: Keys, *, payload: bytes | None = None,
              result_key: str = "", reply_to: str = "", reply: bytes = b"", ttl: int = 1) -> dict[str, Any]:
    dead_id = uuid.uuid4().hex[:16]
    item = {"slot": slot, "action": "dead", "dead_id": dead_id, "dead_list": keys.dead,
            "dead_key": keys.dead_entry(dead_id), "fields": fields, "result_key": result_key,
            "reply_to": reply_to, "reply": reply, "ttl": ttl}
    if payload is not None:
        item["payload"] = payload
    return item


def requeue_item(slot: int) -> dict[str, Any]:
    return {"slot": slot, "action": "requeue"}
