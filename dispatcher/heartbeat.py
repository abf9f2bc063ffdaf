"""Liveness: a heartbeat key with a short TTL, renewed by a thread, and recovery of dead peers.

There is no per-task visibility timeout: a task is re-delivered only when the dispatcher that
holds it stops beating. The thread is independent of the fetch loop, so a task that runs for
hours is never handed to anyone else while its dispatcher lives.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from dispatcher.local import pid_alive
from dispatcher.errors import BrokenKey, LostId
from dispatcher.incidents import Incidents
from dispatcher.store import REDIS_DOWN, Store

logger = logging.getLogger(__name__)


def claim_id(store: Store, host: str, info: dict[str, Any], ttl_ms: int,
             alive: Callable[[int], bool] = pid_alive) -> str:
    """The first free id ``host-N``; a dead predecessor's id on this host is taken over.

    Stable ids mean a dispatcher restarted after a crash finds (and puts back) its own tasks at
    once instead of waiting for its old heartbeat to expire.
    """
    for n in range(1000):
        candidate = f"{host}-{n}"
        if store.claim(candidate, info, ttl_ms):
            return candidate
        old = store.heartbeat_info(candidate)
        pid = int((old or {}).get("pid", 0))
        # Same host name and same pid namespace: containers sharing a host name do not share pids
        if (old and old.get("host") == host and old.get("pidns") == info.get("pidns")
                and (pid == info.get("pid") or not alive(pid))
                and store.take_over(candidate, info, ttl_ms, expected=old)):
            logger.info("dispatcher id %s belonged to pid %s, which is gone: taking it over",
                        candidate, old.get("pid"))
            return candidate
    raise RuntimeError(f"no free dispatcher id on host {host}")


class Heartbeat(threading.Thread):
    """Renews our heartbeat every ttl/3 and puts back the tasks of peers whose heartbeat expired.

    A beat that finds another process's heartbeat under our id (we were away longer than the
    TTL, and it claimed the id) calls ``on_lost`` and stops: the dispatcher must stop too. One
    that finds no heartbeat at all (away past the TTL, id unclaimed) takes it back and calls
    ``on_lapsed``.
    """

    def __init__(self, store: Store, dispatcher_id: str, info: dict[str, Any], ttl: float,
                 on_lost: Callable[[LostId], None], on_lapsed: Callable[[], None]) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.store = store
        self.dispatcher_id = dispatcher_id
        self.info = info
        self.ttl_ms = int(ttl * 1000)
        self.interval = ttl / 3
        self.stopped = threading.Event()
        self._on_lost = on_lost
        self._on_lapsed = on_lapsed
        self._down = False
        self._incidents = Incidents()  # a peer's task that cannot go back: its list's type

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.beat_once()

    def beat_once(self) -> bool:
        """One beat, then the peers' recovery; True if both went through. Also called by the
        loop, whose fetch found our heartbeat missing: it fetches again once it is back."""
        try:
            if not self.store.beat(self.dispatcher_id, self.info, self.ttl_ms):
                logger.warning("heartbeat of %s had lapsed (Redis was unreachable, or this process "
                               "was paused, for over %.0fs): a peer may have put its running tasks "
                               "back, and they may run twice", self.dispatcher_id, self.ttl_ms / 1000)
                self._on_lapsed()
            self.recover_peers()
        except LostId as exc:
            self.stopped.set()
            self._on_lost(exc)
            return False
        except REDIS_DOWN as exc:
            if not self._down:
                logger.warning("heartbeat: Redis unreachable (%s); will keep trying", exc)
            self._down = True
            return False
        except Exception:
            logger.exception("heartbeat failed; will try again")
            return False
        self._down = False
        return True

    def recover_peers(self) -> None:
        for peer in self.store.dispatcher_ids():
            if peer == self.dispatcher_id or self.store.heartbeat_info(peer) is not None:
                continue
            try:
                requeued = self.store.recover_peer(peer)
            except BrokenKey as exc:
                self._incidents.broken_key(exc)
                continue
            self._incidents.key_ok()
            if requeued >= 0:
                logger.warning("dispatcher %s stopped beating: put %d of its tasks back at the head "
                               "of their lists", peer, requeued)

    def stop(self) -> None:
        self.stopped.set()
