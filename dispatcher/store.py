"""All Redis knowledge of redis-dispatcher: the commands, the scripts, the error translation.

Every other module talks to Redis through a Store, by plain named methods. Scripts live in
``lua/*.lua`` and are registered once per Store (redis-py re-sends a script's source by itself
if a restarted server answers NOSCRIPT).
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, NamedTuple, Sequence

import msgpack
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dispatcher.errors import BrokenKey, ConnectionLost, LostId, UnpackableItems
from dispatcher.keys import PRIORITIES, Keys

logger = logging.getLogger(__name__)

REQUEUED, NOT_FOUND = "requeued", "not found"  # what requeue_dead returns, besides a reason

# The errors that mean "Redis is not there right now"; everything else is a bug or bad data.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
WAIT_CHUNK = 5.0  # longest single blocking call, well under any socket timeout we set


def connect(url: str, *, timeout: float | None = 10.0, retries: int = 1) -> redis.Redis:
    """A client with the options every part of the project wants (bytes in, bytes out).

    redis-py re-sends a command after a connection error, even when the server had already run
    it and only the reply was lost. Producers get one such retry (a pooled connection is stale
    after a server restart; a repeated LPUSH is an at-least-once duplicate). The dispatcher must
    get none (retries=0): a repeated fetch would take a second batch and orphan the first; its
    loop backs off and reconciles by itself instead.
    """
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=5.0, health_check_interval=0,
        retry=Retry(NoBackoff(), retries),
    )


def _load(name: str) -> str:
    return resources.files("dispatcher").joinpath("lua", name).read_text(encoding="utf-8")


class Fetched(NamedTuple):
    """One task taken by the fetch script: its slot, the list it came from, the raw element.
    (A named tuple: one is built per task, faster than a frozen dataclass.)"""

    slot: int
    queue: str
    element: bytes


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter. Its id is kept as the bytes stored, since anyone can push to the dead
    list and an id need not be UTF-8; `id` is the text shown to people."""

    raw_id: bytes
    fields: dict[str, Any]

    @property
    def id(self) -> str:
        """The id as text; bytes that are not UTF-8 are shown as \\xNN escapes."""
        return self.raw_id.decode("utf-8", "backslashreplace")


class Store:
    """Named operations on one deployment's keys.

    ``instance`` names this process (this Store) in the heartbeat of the dispatcher id it
    claims: every write to that dispatcher's records checks it, so a process that lost its id
    to another (dispatcher.heartbeat) can no longer touch them (LostId)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.instance = uuid.uuid4().hex
        self._beat = client.register_script(_load("beat.lua"))
        self._fetch = client.register_script(_load("fetch.lua"))
        self._finish = client.register_script(_load("finish.lua"))
        self._reconcile = client.register_script(_load("reconcile.lua"))
        self._dead_requeue = client.register_script(_load("dead_requeue.lua"))
        self._hot_path = _Connection(client)

    # -- producers ---------------------------------------------------------------------------

    def push(self, priority: str, elements: Sequence[bytes]) -> None:
        """LPUSH at the tail; one round trip for the whole batch."""
        if elements:
            self.client.lpush(self.keys.queue(priority), *elements)

    def schedule(self, priority: str, due_ms: int, elements: Sequence[bytes]) -> None:
        """Add to the schedule and wake idle dispatchers, so they wait for the new due time."""
        if elements:
            pipe = self.client.pipeline(transaction=True)
            pipe.zadd(self.keys.schedule(priority), {e: due_ms for e in elements})
            pipe.lpush(self.keys.wake, 1)
            pipe.ltrim(self.keys.wake, 0, 0)
            pipe.execute()

    def wait_result(self, task_id: str, timeout: float | None) -> bytes | None:
        """Block until the task's outcome exists, without consuming it (BLMOVE onto itself).

        Waits in chunks of a few seconds so a client with a socket timeout can wait for hours.
        """
        key = self.keys.result(task_id)
        value = self.client.lindex(key, -1)
        deadline = None if timeout is None else time.monotonic() + timeout
        while value is None:
            left = WAIT_CHUNK if deadline is None else min(WAIT_CHUNK, deadline - time.monotonic())
            if left <= 0:
                return None
            value = self.client.blmove(key, key, max(left, 0.01), "RIGHT", "RIGHT")
        return value

    # -- the dispatcher's hot path -------------------------------------------------------------

    def fetch(self, dispatcher_id: str, most: int) -> list[Fetched] | int:
        """Take up to `most` tasks; without tasks, the ms until the next scheduled one (see fetch.lua)."""
        return self.finish_and_fetch(dispatcher_id, [], most)

    def finish_and_fetch(self, dispatcher_id: str, items: list[dict[str, Any]],
                         most: int, lists: int = 3) -> list[Fetched] | int:
        """finish() then fetch() in one round trip: the hot path of a busy dispatcher. With
        ``most`` 0 it only finishes, and returns [] (the loop is not fetching yet). ``lists`` 1
        takes high tasks only (dispatcher.urgent).

        Two scripts in one pipeline rather than one merged script, so each stays one job. Each
        reply is judged on its own: a server that lost its scripts answers NOSCRIPT to one or
        both, and only the one that did not run is sent again (finish is safe to repeat; a fetch
        that ran must never be repeated, or the batch it took would be orphaned). Any other error
        is raised: the loop then reconciles, which puts back whatever a lost fetch reply took.
        """
        fetch = _evalsha(self._fetch, self._fetch_keys(dispatcher_id), most, lists, self.instance) if most else ()
        commands = [fetch] if most else []
        if items:
            commands.insert(0, _evalsha(self._finish, self._finish_keys(dispatcher_id), _pack(items),
                                        self.instance))
        replies = self._hot_path.call(commands) if commands else []
        if items and not isinstance(replies[0], Exception):
            _finished(replies[0], items)  # its warnings, even if the fetch failed
        for reply in replies:
            if not isinstance(reply, redis.exceptions.NoScriptError):
                _raise_if_error(reply)
        if items and isinstance(replies[0], Exception):
            self.finish(dispatcher_id, items)  # the Script object loads the source on NOSCRIPT
            if most and isinstance(replies[-1], list) and len(replies[-1]) == 1:
                # It took nothing, maybe for want of the tokens this finish gives back: a fresh
                # server's first finish would otherwise read as "no free token".
                replies[-1] = self._hot_path.call([fetch])[0]
        if not most:
            return []
        fetched = replies[-1]
        if isinstance(fetched, Exception):
            self.client.script_load(self._fetch.script)
            fetched = self._hot_path.call([fetch])[0]
            _raise_if_error(fetched)
        return self._fetched(fetched)

    def _fetch_keys(self, dispatcher_id: str) -> list[str]:
        return [self.keys.tokens(dispatcher_id), self.keys.inflight(dispatcher_id),
                *self.keys.queues, *self.keys.schedules, self.keys.wake, self.keys.heartbeat(dispatcher_id)]

    def _finish_keys(self, dispatcher_id: str) -> list[str]:
        return [self.keys.inflight(dispatcher_id), self.keys.tokens(dispatcher_id), self.keys.wake,
                self.keys.heartbeat(dispatcher_id)]

    def _fetched(self, reply: list) -> list[Fetched] | int:
        if len(reply) == 1:
            return int(reply[0])
        queues = self.keys.queues
        return [Fetched(int(reply[i]), queues[int(reply[i + 1]) - 1], reply[i + 2])
                for i in range(0, len(reply), 3)]

    def finish(self, dispatcher_id: str, items: list[dict[str, Any]]) -> int:
        """Apply a batch of outcomes (see finish.lua for the item shapes)."""
        if not items:
            return 0
        return _finished(_run(self._finish, self._finish_keys(dispatcher_id), [_pack(items), self.instance]), items)

    def reconcile(self, dispatcher_id: str, slots: int,
                  known: Iterable[tuple[int, str, bytes]] = (), lapsed: bool = False) -> int:
        """Make our in-flight record and tokens match what we hold; returns tasks put back.
        ``lapsed``: our heartbeat lapsed since the last one (see reconcile.lua's "rejoin")."""
        args: list[Any] = ["rejoin" if lapsed else "self", dispatcher_id, slots, self.instance]
        for slot, queue, element in known:
            args += [slot, queue, element]
        return int(_run(self._reconcile, self._record_keys(dispatcher_id), args))

    def recover_peer(self, dispatcher_id: str) -> int:
        """Put a dead peer's tasks back; -1 if it turned out to be alive."""
        return int(_run(self._reconcile, self._record_keys(dispatcher_id), ["peer", dispatcher_id, 0]))

    def _record_keys(self, dispatcher_id: str) -> list[str]:
        return [self.keys.inflight(dispatcher_id), self.keys.tokens(dispatcher_id),
                self.keys.heartbeat(dispatcher_id), self.keys.dispatchers]

    # -- liveness ----------------------------------------------------------------------------

    def claim(self, dispatcher_id: str, info: dict[str, Any], ttl_ms: int) -> bool:
        """Take an id whose heartbeat does not exist (SET NX): two starting dispatchers never share one."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.heartbeat(dispatcher_id), self._heartbeat(info), px=ttl_ms, nx=True)
        pipe.sadd(self.keys.dispatchers, dispatcher_id)
        return bool(pipe.execute()[0])

    def take_over(self, dispatcher_id: str, info: dict[str, Any], ttl_ms: int,
                  expected: dict[str, Any] | None = None) -> bool:
        """Take an id from a holder known to be gone (``expected``: its heartbeat as read; False
        if it changed meanwhile: two restarts racing for it), or whatever holds it (an id named
        on the command line: a process that still held it stops at its next write, LostId)."""
        key = self.keys.heartbeat(dispatcher_id)
        with self.client.pipeline(transaction=True) as pipe:
            if expected is not None:
                pipe.watch(key)
                raw = pipe.get(key)
                if raw is None or json.loads(raw) != expected:
                    return False
                pipe.multi()
            pipe.set(key, self._heartbeat(info), px=ttl_ms)
            pipe.sadd(self.keys.dispatchers, dispatcher_id)
            try:
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    def beat(self, dispatcher_id: str, info: dict[str, Any], ttl_ms: int) -> bool:
        """Renew our heartbeat; False if it had lapsed (taken again). LostId if another process holds the id."""
        keys = [self.keys.heartbeat(dispatcher_id), self.keys.dispatchers]
        return bool(_run(self._beat, keys, [self._heartbeat(info), ttl_ms, self.instance, dispatcher_id]))

    def _heartbeat(self, info: dict[str, Any]) -> str:
        return json.dumps({**info, "instance": self.instance})

    def heartbeat_info(self, dispatcher_id: str) -> dict[str, Any] | None:
        raw = self.client.get(self.keys.heartbeat(dispatcher_id))
        return json.loads(raw) if raw else None

    def dispatcher_ids(self) -> list[str]:
        return sorted(m.decode() for m in self.client.smembers(self.keys.dispatchers))

    def forget(self, dispatcher_id: str) -> int:
        """A clean exit: drop every record of this dispatcher, putting back anything still in flight.

        Nothing should be in flight by then; if something is (an orphan of a lost reply), it goes
        back to the head of its list rather than being deleted. Returns how many went back.
        """
        key = self.keys.heartbeat(dispatcher_id)
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                pipe.watch(key)  # if another process takes the id meanwhile, its heartbeat stays
                owner = pipe.get(key)
                if owner is not None and self.instance.encode() not in owner:
                    raise LostId(owner.decode(errors="replace"))
                pipe.multi()
                pipe.delete(key)
                try:
                    pipe.execute()
                    break
                except redis.WatchError:  # it changed: look at who holds it now
                    continue
        return max(0, self.recover_peer(dispatcher_id))

    # -- status and dead letters ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counts for the status command. A key of another type (set by hand) counts as None and
        is named under "broken": that is when a person looks here."""
        ids = self.dispatcher_ids()
        asked: list[str] = []
        pipe = self.client.pipeline(transaction=False)
        for priority in PRIORITIES:
            asked += [self.keys.queue(priority), self.keys.schedule(priority)]
            pipe.llen(asked[-2])
            pipe.zcard(asked[-1])
        asked.append(self.keys.dead)
        pipe.llen(self.keys.dead)
        for did in ids:
            asked += [self.keys.heartbeat(did), self.keys.inflight(did), self.keys.tokens(did)]
            pipe.get(asked[-3])
            pipe.hlen(asked[-2])
            pipe.llen(asked[-1])
        replies = pipe.execute(raise_on_error=False)
        broken = {key: self.client.type(key).decode() for key, reply in zip(asked, replies)
                  if isinstance(reply, redis.ResponseError)}
        replies = [None if isinstance(reply, redis.ResponseError) else reply for reply in replies]
        queues = {p: replies[2 * i] for i, p in enumerate(PRIORITIES)}
        scheduled = {p: replies[2 * i + 1] for i, p in enumerate(PRIORITIES)}
        rest = replies[2 * len(PRIORITIES) + 1:]
        dispatchers = {}
        for i, did in enumerate(ids):
            beat, inflight, tokens = rest[3 * i: 3 * i + 3]
            dispatchers[did] = {"alive": beat is not None, "info": json.loads(beat) if beat else None,
                                "in_flight": None if inflight is None else inflight // 2, "free_tokens": tokens}
        return {"queues": queues, "scheduled": scheduled, "dead": replies[2 * len(PRIORITIES)],
                "dispatchers": dispatchers, "broken": broken}

    def in_flight(self, dispatcher_id: str) -> list[tuple[int, str, bytes]]:
        """What one dispatcher holds, as Redis records it: (slot, source list, element), by slot."""
        record = self.client.hgetall(self.keys.inflight(dispatcher_id))
        held = []
        for field, element in record.items():
            if not field.endswith(b":q") and field.isdigit():
                source = record.get(field + b":q", b"?").decode("utf-8", "backslashreplace")
                held.append((int(field), source, element))
        return sorted(held)

    def dead_letters(self, start: int = 0, stop: int = -1) -> list[DeadLetter]:
        ids = self.client.lrange(self.keys.dead, start, stop)
        pipe = self.client.pipeline(transaction=False)
        for raw_id in ids:
            pipe.hgetall(self._dead_entry(raw_id))
        return [DeadLetter(raw_id, {k.decode("utf-8", "backslashreplace"): v for k, v in fields.items()})
                for raw_id, fields in zip(ids, pipe.execute())]

    def requeue_dead(self, dead_id: str | bytes) -> str:
        """Put one dead letter back on its list. Returns "requeued", "not found" (not in the dead
        list: already requeued or purged), or why it was left in place (no payload, a queue key
        of another type): the script checks before it writes, so a failure loses nothing.

        A str id is encoded with surrogateescape, so an id that came from the command line
        (which Python decodes that way) names the same bytes."""
        raw_id = _id_bytes(dead_id)
        keys = [self.keys.dead, self._dead_entry(raw_id)]
        status, detail = self._dead_requeue(keys=keys, args=[raw_id, self.keys.queue("normal")])
        if status == b"requeued":
            return REQUEUED
        return NOT_FOUND if status == b"not found" else detail.decode("utf-8", "backslashreplace")

    def purge_dead(self) -> int:
        """Delete every dead letter, ids that are not UTF-8 or have no hash included."""
        ids = self.client.lrange(self.keys.dead, 0, -1)
        pipe = self.client.pipeline(transaction=True)
        for raw_id in ids:
            pipe.delete(self._dead_entry(raw_id))
            pipe.lrem(self.keys.dead, 1, raw_id)
        pipe.execute()
        return len(ids)

    def _dead_entry(self, raw_id: bytes) -> bytes:
        """The hash key of a dead letter whose id is any bytes (Keys builds names from str)."""
        name = self.keys.dead_entry(raw_id.decode("utf-8", "surrogateescape"))
        return name.encode("utf-8", "surrogateescape")


def _id_bytes(dead_id: str | bytes) -> bytes:
    return dead_id if isinstance(dead_id, bytes) else dead_id.encode("utf-8", "surrogateescape")


class _Connection:
    """One connection of our own for the dispatcher's hot path, used by its loop thread only.

    redis-py's pipeline checks a connection out of the pool, wraps every command and reply, and
    consults its retry policy, on every call: at one round trip per finished task that was a
    third of the loop's time. Here the commands are packed once and the replies read straight
    off the socket. No retry: on any connection error the socket is dropped and the error
    raised, and the caller reconciles (a fetch must never be sent twice). The lock only keeps
    a Store safe to share between threads, as redis-py's client is; the loop never contends.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._conn = client.connection_pool.make_connection()
        self._lock = threading.Lock()

    def call(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send the commands in one write; their replies in order, an error reply as its exception."""
        with self._lock:
            return self._call(commands)

    def _call(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        conn = self._conn
        try:
            conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            conn.disconnect()
            raise


def _evalsha(script: Any, keys: Sequence[str], *args: Any) -> tuple[Any, ...]:
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _raise_if_error(reply: Any) -> None:
    if isinstance(reply, Exception):
        text = str(reply)
        if text.startswith("BADKEY "):  # a key of the wrong type: the script took and wrote nothing
            raise BrokenKey(text[len("BADKEY "):]) from reply
        if text.startswith("LOSTID "):  # another process holds our dispatcher id: nothing written
            raise LostId(text[len("LOSTID "):]) from reply
        raise reply


def _run(script: Any, keys: list[str], args: list[Any]) -> Any:
    """A script's call off the hot path, its refusals as ours (BrokenKey, LostId)."""
    try:
        return script(keys=keys, args=args)
    except redis.ResponseError as exc:
        _raise_if_error(exc)
        raise


def _finished(reply: list, items: list[dict[str, Any]]) -> int:
    """finish.lua's reply: the items applied, then each reply_to that refused its outcome (the
    producer's key: another type, say). Said at WARNING, with where the outcome is instead."""
    for i in range(1, len(reply) - 1, 2):
        slot, why = int(reply[i]), reply[i + 1]
        item = next(item for item in items if item["slot"] == slot)
        logger.warning("could not send an outcome to reply_to %r (%s); it is kept under %s for %ds",
                       item["reply_to"], why.decode(errors="replace") if isinstance(why, bytes) else why,
                       item["keep_key"], item["ttl"])
    return int(reply[0])


def _pack(items: list[dict[str, Any]]) -> bytes:
    # use_bin_type=False: the old msgpack raw type, which every Redis and Valkey cmsgpack reads
    try:
        return msgpack.packb(items, use_bin_type=False)
    except (ValueError, TypeError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        bad = [i for i, item in enumerate(items) if not _packs(item)]
        if not bad:  # the batch as a whole: no item to park, so the loop's error path (a pause)
            raise
        raise UnpackableItems(bad, repr(exc)) from exc


def _packs(item: dict[str, Any]) -> bool:
    try:
        msgpack.packb(item, use_bin_type=False)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def translate(exc: BaseException) -> ConnectionLost:
    """The one place a redis-py connection error becomes ours (raise translate(e) from e)."""
    return ConnectionLost(f"Redis is unreachable: {exc}")
