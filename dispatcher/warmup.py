"""Take no task before the worker children can run one.

Children start in the background: a fork server, then the task modules' imports (about 0.1 s,
more for heavy modules). Tasks fetched before then would wait in the pool's queue, held from every
other dispatcher, and held for good if the children cannot start at all (a task module that
fails to import in a child). So a starting dispatcher first runs a short no-op job
(``execute.warm_up``, which returns its child's pid) until ``procs`` different children have each
run one, and only then fetches.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Callable

from dispatcher.execute import warm_up
from worker_pool import JobEnd, WorkerPool

logger = logging.getLogger(__name__)

REPORT_EVERY = 10.0  # while children are not ready, an error this often


class WarmUp:
    """The warm-up of one pool. ``check()`` is called by the dispatcher's loop only."""

    def __init__(self, pool: WorkerPool, procs: int, wake: Callable[[], None]) -> None:
        self._pool = pool
        self._procs = procs
        self._wake = wake           # wakes the loop: every end must be looked at
        self._ends: collections.deque[JobEnd] = collections.deque()
        self._pids: set[int] = set()
        self._jobs = 0
        self._since = time.monotonic()
        self._report_at = self._since + REPORT_EVERY
        for _ in range(procs):
            self._submit()

    def _submit(self) -> None:
        self._pool.submit(("warm-up", self._jobs), warm_up, on_end=self._on_end)
        self._jobs += 1

    def _on_end(self, end: JobEnd) -> None:
        """Runs in a pool thread: hand the end to the loop."""
        self._ends.append(end)
        self._wake()

    def check(self) -> float | None:
        """None once ``procs`` children have run a warm-up; else how long the loop may sleep.

        A child that is first to start takes the next warm-up too, and a warm-up can be lost
        with its child: either way another goes in, until enough different children ran one."""
        while self._ends:
            end = self._ends.popleft()
            if end.ok and end.value not in self._pids:
                self._pids.add(end.value)
                continue
            if not end.ok:
                logger.warning("a worker's warm-up job failed (%s: %s); trying again",
                               end.error_type, end.error_message)
            if len(self._pids) < self._procs:
                self._submit()
        if len(self._pids) >= self._procs:
            return None
        now = time.monotonic()
        if now >= self._report_at:
            logger.error("%d of %d worker children ready after %.0fs: taking no tasks until all are "
                         "(do the task modules import in a fresh process?)", len(self._pids),
                         self._procs, now - self._since)
            self._report_at = now + REPORT_EVERY
        return self._report_at - now
