"""The warm-up that keeps a starting dispatcher from taking tasks before its children are up."""
from __future__ import annotations

import threading
import time

import pytest

from dispatcher.warmup import REPORT_EVERY, WarmUp
from worker_pool import JobEnd, WorkerPool


@pytest.mark.timeout(30)
@pytest.mark.parametrize("procs", [1, 3])
def test_ready_only_once_every_child_has_run_a_warm_up(procs):
    woke = threading.Event()
    with WorkerPool(procs) as pool:
        warm = WarmUp(pool, procs, woke.set)
        deadline = time.monotonic() + 20
        while True:
            woke.clear()  # before check(): an end after it sets it again (the loop's own order)
            wait = warm.check()
            if wait is None:
                break
            assert 0 < wait <= REPORT_EVERY
            assert time.monotonic() < deadline, "children never all ran a warm-up"
            woke.wait(wait)
        assert warm._pids == set(pool.pids())  # each child, not one child several times
        assert warm.check() is None


class _Pool:
    """Stands in for WorkerPool (no processes): records submissions; can refuse one."""

    def __init__(self) -> None:
        self.jobs: list = []
        self.refuse_next = False

    def submit(self, key, fn, args, *, on_end) -> None:
        if self.refuse_next:
            self.refuse_next = False
            raise OSError("task pipe broke")
        self.jobs.append((key, args, on_end))

    def end(self, pid: int | None) -> None:
        """End the oldest job: run by ``pid``, or lost with its child (None)."""
        key, _, on_end = self.jobs.pop(0)
        if pid is None:
            on_end(JobEnd(key, False, None, "WorkerLost", "child died", "", None, time.time()))
        else:
            on_end(JobEnd(key, True, pid, "", "", "", time.time(), time.time(), 0.01))


def test_rounds_until_every_child_ran_one_and_a_refused_submit_is_retried():
    pool = _Pool()
    warm = WarmUp(pool, 2, lambda: None)
    first_sleep = pool.jobs[0][1][0]
    assert len(pool.jobs) == 2
    pool.end(111)
    pool.end(111)                       # one child ran both: another round
    pool.refuse_next = True
    with pytest.raises(OSError):
        warm.check()
    assert warm.check() is not None     # the refused round is started again, not lost
    assert len(pool.jobs) == 2 and pool.jobs[0][1][0] == 2 * first_sleep  # and sleeps longer
    pool.end(None)                      # lost with its child: does not count
    pool.end(111)
    assert warm.check() is not None and len(pool.jobs) == 2
    pool.end(222)                       # a second child at last
    assert warm.check() is None
