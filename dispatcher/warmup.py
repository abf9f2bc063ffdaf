"""Take no task before the worker children can run one.

Children start in the background: a fork server, then the task modules' imports (about 0.1 s,
more for heavy modules). Tasks fetched before then would wait in the pool's queue, held from every
other dispatcher, and held for good if the children cannot start at all (a task module that
fails to import in a child). So a starting dispatcher first runs rounds of short no-op jobs
(``execute.warm_up``, which returns its child's pid), one per child, until ``procs`` different
children have each run one, and only then fetches. A round's jobs all sleep, so that each idle
child takes one rather than one child taking them all; later rounds sleep longer (up to a
second), so a child that never starts costs a few wake-ups a second, not a storm. Until then the
dispatcher takes no task at all, even if only one child is missing: an ERROR every 10 s says how
many are ready.
"""
from __future__ import annotations

import collections
import logging
import time
from typing import Callable

from dispatcher.execute import warm_up
from worker_pool import JobEnd, WorkerPool

logger = logging.getLogger(__name__)

REPORT_EVERY = 10.0   # while children are not ready, an error this often
FIRST_SLEEP = 0.01    # a first round's warm-up job; each later round's sleeps twice as long
LONGEST_SLEEP = 1.0


class WarmUp:
    """The warm-up of one pool. ``check()`` is called by the dispatcher's loop only."""

    def __init__(self, pool: WorkerPool, procs: int, wake: Callable[[], None]) -> None:
        self._pool = pool
        self._procs = procs
        self._wake = wake           # wakes the loop: every end must be looked at
        self._ends: collections.deque[JobEnd] = collections.deque()
        self._pids: set[int] = set()
        self._jobs = 0              # submitted so far (their keys)
        self._outstanding = 0       # submitted, end not yet looked at
        self._sleep = FIRST_SLEEP
        self._since = time.monotonic()
        self._report_at = self._since + REPORT_EVERY
        self._start_round()

    def _start_round(self) -> None:
        for _ in range(self._procs):
            self._pool.submit(("warm-up", self._jobs), warm_up, (self._sleep,), on_end=self._on_end)
            self._jobs += 1
            self._outstanding += 1
        self._sleep = min(2 * self._sleep, LONGEST_SLEEP)

    def _on_end(self, end: JobEnd) -> None:
        """Runs in a pool thread: hand the end to the loop."""
        self._ends.append(end)
        self._wake()

    def check(self) -> float | None:
        """None once ``procs`` children have run a warm-up; else how long the loop may sleep."""
        while self._ends:
            end = self._ends.popleft()
            self._outstanding -= 1
            if end.ok:
                self._pids.add(end.value)
            else:
                logger.warning("a worker's warm-up job failed (%s: %s)", end.error_type, end.error_message)
        if len(self._pids) >= self._procs:
            return None
        if not self._outstanding:
            self._start_round()  # if this raises, the next check() starts one again
        now = time.monotonic()
        if now >= self._report_at:
            logger.error("%d of %d worker children ready after %.0fs: taking no tasks until all are "
                         "(do the task modules import in a fresh process?)", len(self._pids),
                         self._procs, now - self._since)
            self._report_at = now + REPORT_EVERY
        return self._report_at - now
