"""What the dispatcher's loop sleeps on: blocking waits on the priority lists that consume
nothing (DESIGN.md section 4), and a self-pipe for everything else that wakes it. Also the
watcher that sees a high task pushed while the loop is busy (``Watch``).

``BLMOVE q q RIGHT RIGHT`` moves a list's last element onto itself: it returns as soon as the
list is non-empty and leaves the list as it was. Each list has its own connection. The loop arms
them after a fetch that found nothing, then sleeps in one ``select`` over their sockets and the
self-pipe, and reads a reply itself when one arrives: no thread sits between a push and the
fetch it causes. A push landing between the empty fetch and the arming makes BLMOVE return at
once, so no wake-up is lost.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import time
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Sequence

import redis

from dispatcher.local import pid_alive
from dispatcher.store import REDIS_DOWN
from dispatcher.urgent import Bar

logger = logging.getLogger(__name__)

BLOCK_SECONDS = 5  # one BLMOVE's block; a reply overdue by LATE more means the link is dead
LATE = 5.0
WATCH_BACKOFF = 2.0  # longest pause of the watcher between tries while Redis is unreachable
WATCH_BLOCK = 1      # the watcher's longest wait before it checks that its dispatcher lives


def send_look(conn: redis.connection.Connection, key: str, seconds: float) -> None:
    """Send ``BLMOVE key key RIGHT RIGHT seconds``: a wait for the list to hold anything that
    consumes nothing. Its reply is the list's last element, or None after ``seconds``."""
    conn.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", seconds, check_health=False)


class Wakeup:
    """A self-pipe: ``set()`` from any thread (or a signal handler) wakes the loop's select.

    ``set()`` writes only when no wake-up is pending, and ``clear()`` empties the pipe before it
    lets the next ``set()`` write: one byte is in flight (a few if setters race; harmless).
    Whoever calls ``set()`` after changing state is sure the loop sees that change after its
    next ``clear()``.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._pending = False
        self._closed = False

    def fileno(self) -> int:
        return self._read

    def is_set(self) -> bool:
        return self._pending

    def set(self) -> None:
        if not self._pending and not self._closed:
            self._pending = True
            try:
                os.write(self._write, b"!")
            except (BlockingIOError, OSError):
                pass  # full (the loop will wake anyway) or closed (the loop has ended)

    def clear(self) -> None:
        # One read empties the pipe (a byte, a few at most), once per turn of the loop; a byte
        # left over would only cost a spare turn.
        try:
            os.read(self._read, 512)
        except (BlockingIOError, OSError):
            pass
        self._pending = False

    def close(self) -> None:
        self._closed = True  # a late set() must never write to a reused descriptor
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


class Waiter:
    """One list's non-consuming blocking wait, sent and read by the loop's own thread."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.key = key
        self._conn = client.connection_pool.make_connection()
        self._sent_at: float | None = None  # monotonic time of the BLMOVE awaiting its reply

    def arm(self) -> None:
        if self._sent_at is not None:
            return
        try:
            send_look(self._conn, self.key, BLOCK_SECONDS)
            self._sent_at = time.monotonic()
        except REDIS_DOWN:
            self._conn.disconnect()  # the loop's fetch reports the outage; next arm() reconnects

    def fileno(self) -> int | None:
        sock = self._conn._sock
        return sock.fileno() if self._sent_at is not None and sock is not None else None

    def read(self) -> bool:
        """The socket is readable: True if the loop should look (a task arrived, or the link
        broke and its fetch will find out why); re-arms by itself after an empty block."""
        self._sent_at = None
        try:
            got = self._conn.read_response()
        except (*REDIS_DOWN, redis.ResponseError) as exc:
            logger.debug("waiter on %s: %s", self.key, exc)
            self._conn.disconnect()
            return True
        if got is None:
            self.arm()
        return got is not None

    def drop_if_overdue(self, now: float) -> None:
        if self._sent_at is not None and now - self._sent_at > BLOCK_SECONDS + LATE:
            logger.warning("waiter on %s: no reply for %.0fs; reconnecting", self.key, now - self._sent_at)
            self._sent_at = None
            self._conn.disconnect()
            self.arm()

    def close(self) -> None:
        self._sent_at = None
        self._conn.disconnect()


class Waiters:
    """The waiters of one dispatcher and its wake-up pipe: what its loop sleeps on."""

    def __init__(self, client: redis.Redis, keys: Sequence[str], wakeup: Wakeup) -> None:
        self._waiters = [Waiter(client, key) for key in keys]
        self._wakeup = wakeup

    def arm(self) -> None:
        for waiter in self._waiters:
            waiter.arm()

    def wait(self, timeout: float) -> bool:
        """Sleep until a wake-up, a task on a list, or the timeout; True unless it timed out."""
        by_fd = {fd: w for w in self._waiters if (fd := w.fileno()) is not None}
        try:
            ready, _, _ = select.select([self._wakeup.fileno(), *by_fd], [], [], timeout)
        except (OSError, ValueError):  # a socket closed under us: look again next turn
            return True
        woke = False
        for fd in ready:
            waiter = by_fd.get(fd)
            got = waiter.read() if waiter is not None else True
            woke = woke or got
        if not woke:
            now = time.monotonic()
            for waiter in self._waiters:
                waiter.drop_if_overdue(now)
        return woke

    def close(self) -> None:
        for waiter in self._waiters:
            waiter.close()


class Watch:
    """A process that waits on one list, on a connection of its own, and raises the bar
    (dispatcher.urgent) the moment the list holds anything; then it rests until the loop has
    lowered the bar and asks it to watch again.

    A process, not a thread: in a busy dispatcher a thread took 0.25 to 1 ms to get the GIL and
    see the push, while children started dozens of short tasks; this process sees it in about
    0.1 to 0.3 ms on two busy cores. It does not wake the loop, which sees the bar on its next
    turn: a loop with free slots and nothing to fetch waits on every list itself, and one with
    tasks queued in the pool is woken by the first of them a child hands back (or by any task's
    end). The loop asks through a pipe, not a lock or an event: a lock held by a killed process
    is held for good.
    """

    def __init__(self, client: redis.Redis, key: str, bar: Bar, ctx: BaseContext) -> None:
        pool = client.connection_pool
        plain = (str, bytes, int, float, bool, type(None))  # what a new process can be given
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if isinstance(v, plain)}
        self._key = key
        self._bar = bar
        self._ctx = ctx
        self._asks, self._ask = ctx.Pipe(duplex=False)
        self._args = (pool.connection_class, kwargs, key, bar, self._asks, os.getpid())
        self.watching = False  # asked, and the bar not raised since
        self._process = self._new_process()

    def _new_process(self) -> BaseProcess:
        process = self._ctx.Process(target=_watch, args=self._args, name=f"watch {self._key}", daemon=True)
        process.start()
        return process

    def want(self) -> None:
        """Watch (again); the loop calls this only with the bar down."""
        self._replace_if_gone()
        self._ask.send_bytes(b"")
        self.watching = True

    def replace_if_gone(self) -> None:
        """Start another watcher if this one died; it watches if the one before was asked to."""
        if self._replace_if_gone() and self.watching and not self._bar.raised:
            self._ask.send_bytes(b"")

    def _replace_if_gone(self) -> bool:
        if self._process.is_alive():
            return False
        # Killed (the OOM killer, an operator): without it, high tasks would silently stop
        # passing the prefetch
        logger.warning("watcher of %s (pid %s) is gone (exit code %s); starting another",
                       self._key, self._process.pid, self._process.exitcode)
        try:
            self._process = self._new_process()
        except Exception:  # out of processes or memory: the lane is off until the next try
            logger.exception("could not start a watcher of %s; trying again in a second", self._key)
            return False
        return True

    def lower(self, watch_again: bool) -> None:
        """The loop has seen the bar raised and dealt with it."""
        self._bar.lower()
        self.watching = False
        if watch_again:
            self.want()

    def close(self) -> None:
        self._process.terminate()
        self._process.join(1.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(1.0)
        self._ask.close()
        self._asks.close()


def _watch(connection_class: type, kwargs: dict, key: str, bar: Bar, asks: Connection,
           dispatcher: int) -> None:
    """The watcher process: while its dispatcher lives, for each ask, BLMOVE onto itself until
    the list holds anything, then raise the bar.

    It checks for its dispatcher by pid, not by parent: under forkserver its parent is the fork
    server, which outlives a killed dispatcher for as long as any of its children does.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the dispatcher owns Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked one inherits the dispatcher's handler
    conn = connection_class(**kwargs)
    delay = 0.05
    asked = False
    while pid_alive(dispatcher):
        if not asked:
            try:
                if not asks.poll(WATCH_BLOCK):
                    continue
                while asks.poll(0):
                    asks.recv_bytes()
            except (EOFError, OSError):
                return  # no one can ask any more: the dispatcher closed its end, or died
            asked = True
        try:
            send_look(conn, key, WATCH_BLOCK)
            got = conn.read_response()
        except Exception:  # Redis away, or a reply we cannot read: never die, never spin
            conn.disconnect()
            time.sleep(delay)
            delay = min(WATCH_BACKOFF, delay * 2)
            continue
        delay = 0.05
        if got is not None:
            bar.raise_()
            asked = False
