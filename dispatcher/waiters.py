"""What the dispatcher's loop sleeps on: blocking waits on the priority lists that consume
nothing (DESIGN.md section 4), and a self-pipe for everything else that wakes it. A worker child
keeps a ``Waiter`` of its own on the high list (``dispatcher.urgent.Peek``).

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
import time
from typing import Sequence

import redis

from dispatcher.store import REDIS_DOWN

logger = logging.getLogger(__name__)

BLOCK_SECONDS = 5  # one BLMOVE's block; a reply overdue by LATE more means the link is dead
LATE = 5.0


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
    """One list's non-consuming blocking wait, sent and read by one thread: the loop's, or a
    worker child's (``dispatcher.urgent.Peek``)."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.key = key
        self._conn = client.connection_pool.make_connection()
        self._sent_at: float | None = None  # monotonic time of the BLMOVE awaiting its reply
        self.error: Exception | None = None  # why the last arm() or read() failed

    def arm(self) -> None:
        if self._sent_at is not None:
            return
        try:
            send_look(self._conn, self.key, BLOCK_SECONDS)
            self._sent_at = time.monotonic()
        except REDIS_DOWN as exc:
            self.error = exc
            self._conn.disconnect()  # the loop's fetch reports the outage; next arm() reconnects

    def fileno(self) -> int | None:
        sock = self._conn._sock
        return sock.fileno() if self._sent_at is not None and sock is not None else None

    def read(self) -> bool | None:
        """The socket is readable: True if the list holds anything; False after an empty block
        (the wait is sent again); None if the link broke (disconnected: the next ``arm()``
        connects again)."""
        self._sent_at = None
        try:
            got = self._conn.read_response()
        except (*REDIS_DOWN, redis.ResponseError) as exc:
            logger.debug("waiter on %s: %s", self.key, exc)
            self.error = exc
            self._conn.disconnect()
            return None
        if got is None:
            self.arm()
        return got is not None

    def length(self) -> int:
        """LLEN of the list, on this connection: only while no wait is sent."""
        self._conn.send_command("LLEN", self.key, check_health=False)
        return self._conn.read_response()

    def drop_if_overdue(self, now: float) -> bool:
        """True if the reply was overdue: the wait was sent again on a new connection (or could
        not be, ``fileno()`` says which)."""
        if self._sent_at is None or now - self._sent_at <= BLOCK_SECONDS + LATE:
            return False
        logger.warning("waiter on %s: no reply for %.0fs; reconnecting", self.key, now - self._sent_at)
        self._sent_at = None
        self._conn.disconnect()
        self.arm()
        return True

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
            # a task arrived, or the link broke and the loop's fetch will find out why
            if waiter is None or waiter.read() is not False:
                woke = True
        if not woke:
            now = time.monotonic()
            for waiter in self._waiters:
                waiter.drop_if_overdue(now)
        return woke

    def close(self) -> None:
        for waiter in self._waiters:
            waiter.close()
