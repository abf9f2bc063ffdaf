"""Blocking waits on the priority lists that consume nothing (DESIGN.md section 4).

``BLMOVE q q RIGHT RIGHT`` moves a list's last element onto itself: it returns as soon as the
list is non-empty and leaves the list as it was. One waiter per list, each on its own connection
and thread, is armed by the dispatcher after a fetch that found nothing; the first list to get a
task wakes the fetch loop. A push landing between the empty fetch and the arming makes BLMOVE
return at once, so no wake-up is lost.
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

import redis

from dispatcher.store import REDIS_DOWN

logger = logging.getLogger(__name__)

BLOCK_SECONDS = 5.0  # one BLMOVE's block; under the client's socket timeout, so a dead link shows


class Waiter(threading.Thread):
    def __init__(self, client: redis.Redis, key: str, wake: threading.Event) -> None:
        super().__init__(name=f"waiter:{key}", daemon=True)
        self.client = client
        self.key = key
        self.wake = wake
        self.armed = threading.Event()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            if not self.armed.wait(0.5):
                continue
            try:
                got = self.client.blmove(self.key, self.key, BLOCK_SECONDS, "RIGHT", "RIGHT")
            except REDIS_DOWN:
                self.stopped.wait(0.5)  # the main loop reports the outage; just do not spin
                continue
            except Exception:
                logger.exception("waiter on %s failed; retrying", self.key)
                self.stopped.wait(0.5)
                continue
            if got is not None:
                self.armed.clear()
                self.wake.set()


class Waiters:
    """The set of waiters of one dispatcher."""

    def __init__(self, client: redis.Redis, keys: Sequence[str], wake: threading.Event) -> None:
        self._waiters = [Waiter(client, key, wake) for key in keys]

    def start(self) -> None:
        for waiter in self._waiters:
            waiter.start()

    def arm(self) -> None:
        for waiter in self._waiters:
            waiter.armed.set()

    def stop(self) -> None:
        for waiter in self._waiters:
            waiter.stopped.set()
            waiter.armed.set()
