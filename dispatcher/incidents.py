"""What the loop says about trouble it waits out: Redis unreachable, a key of the wrong type.

Each is said when it starts, again each minute while it lasts, and once when it ends: a log read
at 3 a.m. must show that the trouble still lasts, not only that it began. What the loop does
about it (reconcile, lower the high lane's bar, back off) stays in the loop.
"""
from __future__ import annotations

import logging
import time

import redis

from dispatcher.errors import BrokenKey

logger = logging.getLogger(__name__)

BACKOFF_FIRST = 0.05  # first pause between tries while Redis is unreachable, doubling...
BACKOFF_MAX = 2.0     # ...up to this
REMINDER = 60.0       # seconds between errors while one lasts


class Incidents:
    def __init__(self) -> None:
        self._down_since: float | None = None
        self._down_said = 0.0
        self._delay = BACKOFF_FIRST
        self._broken: tuple[str, float] | None = None  # a BrokenKey: its message, when last said

    @property
    def delay(self) -> float:
        """How long to wait before the next try while Redis is unreachable."""
        return self._delay

    def redis_down(self, exc: Exception, running: int, pending: int) -> float:
        """Record a failed try; returns how long to wait before the next."""
        now = time.monotonic()
        why = (f"it refuses this dispatcher's password, which only a mended password or URL ends: {exc}"
               if isinstance(exc, redis.AuthenticationError) else str(exc))
        if self._down_since is None:
            self._down_since = self._down_said = now
            logger.error("Redis unreachable (%s): %d running, %d outcome(s) kept in memory; retrying "
                         "with backoff up to %.0fs", why, running, pending, BACKOFF_MAX)
        else:
            self._delay = min(BACKOFF_MAX, self._delay * 2)
            if now - self._down_said >= REMINDER:
                self._down_said = now
                logger.error("Redis still unreachable after %.0fs (%s): %d running, %d outcome(s) kept "
                             "in memory", now - self._down_since, why, running, pending)
        return self._delay

    def redis_back(self) -> None:
        if self._down_since is not None:
            logger.warning("Redis is back after %.1fs; outcomes written, records reconciled",
                           time.monotonic() - self._down_since)
            self._down_since = None
            self._delay = BACKOFF_FIRST

    def broken_key(self, exc: BrokenKey) -> None:
        """Nothing goes on until a person mends the key: this line is how they learn which."""
        now = time.monotonic()
        if self._broken is None or self._broken[0] != str(exc) or now - self._broken[1] >= REMINDER:
            logger.error("cannot go on: %s. Nothing was taken or written; waiting until the key is "
                         "mended (renamed or deleted)", exc)
            self._broken = (str(exc), now)

    def key_ok(self) -> None:
        """The call that met a broken key went through."""
        if self._broken is not None:
            logger.warning("going on: the key is mended")
            self._broken = None
