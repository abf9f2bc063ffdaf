"""The Python producer: a thin face over Store.

``Client().enqueue("example.square", 9, priority="high").result(timeout=5)``. Tasks go out as
msgpack maps; a redis-cli user can push JSON to the same lists and both run the same way.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping

import redis

from dispatcher.codec import Task, decode_value, new_task_id, MSGPACK
from dispatcher.errors import ConfigError, ResultTimeout, TaskFailed
from dispatcher.keys import DEFAULT_PREFIX, PRIORITIES, Keys
from dispatcher.server import default_state_dir, running_server_url
from dispatcher.store import REDIS_DOWN, Store, connect, translate


@dataclass(frozen=True)
class Call:
    """One task to enqueue with enqueue_many: name, args, kwargs."""

    name: str
    args: tuple = ()
    kwargs: Mapping[str, Any] | None = None


class TaskHandle:
    """What enqueue returns: the task's id and a way to wait for its outcome."""

    def __init__(self, client: "Client", task_id: str, name: str) -> None:
        self.client = client
        self.id = task_id
        self.name = name

    def __repr__(self) -> str:
        return f"<TaskHandle {self.name} {self.id}>"

    def outcome(self, timeout: float | None = 0) -> dict[str, Any] | None:
        """The raw outcome map, waiting up to `timeout` seconds (None: no limit); None if not there."""
        try:
            raw = self.client.store.wait_result(self.id, timeout)
        except REDIS_DOWN as exc:
            raise translate(exc) from exc
        return None if raw is None else decode_value(raw)

    def result(self, timeout: float | None = None) -> Any:
        """The task's return value; TaskFailed if it failed for good, ResultTimeout if not in time."""
        outcome = self.outcome(timeout)
        if outcome is None:
            raise ResultTimeout(f"task {self.name} {self.id}: no result within {timeout}s "
                                "(it may still be queued, running or waiting for a retry)")
        if outcome.get("status") == "ok":
            return outcome.get("result")
        raise TaskFailed(self.id, str(outcome.get("error")), str(outcome.get("message")),
                         str(outcome.get("traceback") or ""))


class Client:
    """Enqueues tasks onto one deployment's lists."""

    def __init__(self, url: str | None = None, *, prefix: str = DEFAULT_PREFIX,
                 client: redis.Redis | None = None) -> None:
        if client is None:
            client = connect(url or _default_url())
        self.redis = client
        self.store = Store(client, Keys(prefix))

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enqueue(self, name: str, *args: Any, priority: str = "normal", countdown: float | None = None,
                eta: datetime | float | None = None, **kwargs: Any) -> TaskHandle:
        """Enqueue one task; extra keyword arguments are the task's own kwargs.

        The names priority, countdown and eta are taken by this method; use enqueue_call for a task
        with parameters of those names or for per-call policy (max_retries, time_limit, ...).
        """
        return self.enqueue_call(Call(name, args, kwargs), priority=priority, countdown=countdown, eta=eta)

    def enqueue_call(self, call: Call, *, priority: str = "normal", countdown: float | None = None,
                     eta: datetime | float | None = None, result: bool = True,
                     **policy: Any) -> TaskHandle:
        task = self._task(call, result, policy)
        self._send(priority, [task], _due(countdown, eta))
        return TaskHandle(self, task.id, task.name)

    def enqueue_many(self, calls: Iterable[Call | tuple], *, priority: str = "normal",
                     result: bool = True) -> list[TaskHandle]:
        """Enqueue a batch in one round trip; calls are Call objects or (name, args[, kwargs]) tuples."""
        tasks = [self._task(c if isinstance(c, Call) else Call(*c), result, {}) for c in calls]
        self._send(priority, tasks, None)
        return [TaskHandle(self, t.id, t.name) for t in tasks]

    def handle(self, task_id: str, name: str = "?") -> TaskHandle:
        """A handle for a task enqueued elsewhere (by id), e.g. to wait for its result."""
        return TaskHandle(self, task_id, name)

    def _task(self, call: Call, result: bool, policy: dict[str, Any]) -> Task:
        allowed = {"max_retries", "time_limit", "soft_time_limit", "task_id", "reply_to"}
        unknown = set(policy) - allowed
        if unknown:
            raise ConfigError(f"unknown enqueue option(s): {', '.join(sorted(unknown))}")
        return Task(name=call.name, args=tuple(call.args), kwargs=dict(call.kwargs or {}),
                    id=policy.get("task_id") or new_task_id(), codec=MSGPACK, want_result=result,
                    reply_to=policy.get("reply_to"), max_retries=policy.get("max_retries"),
                    time_limit=policy.get("time_limit"), soft_time_limit=policy.get("soft_time_limit"),
                    enqueued_at=time.time())

    def _send(self, priority: str, tasks: list[Task], due: float | None) -> None:
        if priority not in PRIORITIES:
            raise ConfigError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
        elements = [t.encode() for t in tasks]
        try:
            if due is None:
                self.store.push(priority, elements)
            else:
                self.store.schedule(priority, int(due * 1000), elements)
        except REDIS_DOWN as exc:
            raise translate(exc) from exc


def _due(countdown: float | None, eta: datetime | float | None) -> float | None:
    if countdown is not None and eta is not None:
        raise ConfigError("give countdown or eta, not both")
    if countdown is not None:
        return time.time() + countdown
    if isinstance(eta, datetime):
        return eta.timestamp()
    return eta


def _default_url() -> str:
    """Client() finds the server the way the dispatcher does, without ever starting one.

    Like the CLI, this public face reads REDIS_URL; nothing deeper reads the environment.
    """
    return os.environ.get("REDIS_URL") or running_server_url(default_state_dir(os.environ))
