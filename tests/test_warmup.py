"""The warm-up that keeps a starting dispatcher from taking tasks before its children are up."""
from __future__ import annotations

import threading
import time

import pytest

from dispatcher.warmup import REPORT_EVERY, WarmUp
from worker_pool import WorkerPool


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
