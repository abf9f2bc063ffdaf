"""worker_pool: every submitted job ends exactly once, whatever happens to its child.

Real processes, real signals. Every wait polls a condition against a deadline.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import random
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # pool children import pool_jobs by name; they inherit sys.path

import pool_jobs  # noqa: E402

from worker_pool import Call, JobEnd, WorkerPool  # noqa: E402
from worker_pool.queues import (  # noqa: E402
    FIRST, FRAME, FRAME_BODY, LAST, READ_AHEAD, ResultQueue, TaskQueue, dumps,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")


class Ends:
    """An on_end callback that records every end and lets a test wait for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.ends: list[JobEnd] = []

    def __call__(self, end: JobEnd) -> None:
        with self._cond:
            self.ends.append(end)
            self._cond.notify_all()

    def wait(self, count: int, timeout: float = 10.0) -> list[JobEnd]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.ends) >= count, timeout):
                pytest.fail(f"only {len(self.ends)} of {count} jobs ended within {timeout}s")
            return list(self.ends)

    def one(self, timeout: float = 10.0) -> JobEnd:
        return self.wait(1, timeout)[0]


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def make_pool() -> Iterator[Callable[..., WorkerPool]]:
    pools: list[WorkerPool] = []

    def make(procs: int = 2, **kwargs: object) -> WorkerPool:
        pool = WorkerPool(procs, **kwargs)
        pools.append(pool)
        wait_until(lambda: pool.live_children() == procs, 10, "the children to start")
        return pool

    yield make
    for pool in pools:
        pool.terminate()


def run_one(pool: WorkerPool, fn: Callable, *args: object, **kwargs: object) -> JobEnd:
    ends = Ends()
    pool.submit(("one", fn.__name__, time.monotonic()), fn, args, on_end=ends, **kwargs)
    return ends.one()


def assert_back_to_full_strength(pool: WorkerPool, procs: int, old_pids: list[int]) -> None:
    wait_until(lambda: pool.live_children() == procs, 5, "the pool to replace its child")
    end = run_one(pool, pool_jobs.double, 21)
    assert end.ok and end.value == 42
    assert set(pool.pids()) != set(old_pids)


def running_pid(pool: WorkerPool, key: object) -> int:
    wait_until(lambda: key in pool.running(), 5, f"job {key!r} to start")
    return pool.running()[key][0]


# -- ordinary ends ------------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_ok_result(make_pool):
    pool = make_pool()
    ends = Ends()
    before = time.time()
    pool.submit("k", pool_jobs.double, (21,), on_end=ends)
    end = ends.one()
    assert (end.key, end.ok, end.value, end.error_type, end.traceback) == ("k", True, 42, "", "")
    assert before <= end.started <= end.ended
    assert pool.pending() == 0 and pool.running() == {}


@pytest.mark.timeout(20)
def test_exception_carries_the_remote_traceback(make_pool):
    end = run_one(make_pool(), pool_jobs.fail, "no good")
    assert not end.ok and end.value is None
    assert (end.error_type, end.error_message) == ("ValueError", "no good")
    assert "in fail" in end.traceback and "pool_jobs.py" in end.traceback
    assert end.started is not None


@pytest.mark.timeout(20)
def test_a_job_that_declines_ends_with_its_error_but_no_traceback(make_pool):
    end = run_one(make_pool(), pool_jobs.decline, "not now")
    assert (end.ok, end.error_type, end.error_message, end.traceback) == (False, "Busy", "not now", "")


@pytest.mark.timeout(20)
def test_system_exit_in_fn_is_an_error_not_a_death(make_pool):
    pool = make_pool(1)
    pid = pool.pids()[0]
    end = run_one(pool, pool_jobs.sys_exit, 5)
    assert (end.ok, end.error_type, end.error_message) == (False, "SystemExit", "5")
    assert pool.pids() == [pid]


@pytest.mark.timeout(20)
def test_unpicklable_result_is_an_error_and_the_pool_goes_on(make_pool):
    pool = make_pool()
    end = run_one(pool, pool_jobs.unpicklable_result)
    assert not end.ok and end.error_type == "MaybeEncodingError"
    assert "could not be sent" in end.error_message and "lock" in end.error_message
    assert end.started is not None
    assert run_one(pool, pool_jobs.double, 1).value == 2


@pytest.mark.timeout(20)
def test_unpicklable_argument_fails_without_starting(make_pool):
    end = run_one(make_pool(), pool_jobs.double, threading.Lock())
    assert not end.ok and end.started is None
    assert "pickle" in end.error_message


@pytest.mark.timeout(20)
def test_running_and_pending_show_a_started_job(make_pool):
    pool = make_pool()
    ends = Ends()
    pool.submit("slow", pool_jobs.sleep, (0.5,), on_end=ends)
    pid = running_pid(pool, "slow")
    assert pid in pool.pids() and pool.pending() == 1
    assert ends.one().value == 0.5
    assert pool.pending() == 0 and pool.running() == {}


@pytest.mark.timeout(20)
def test_submit_rejects_a_pending_key_and_a_closed_pool(make_pool):
    pool = make_pool()
    ends = Ends()
    pool.submit("k", pool_jobs.sleep, (0.2,), on_end=ends)
    with pytest.raises(ValueError, match="not ended"):
        pool.submit("k", pool_jobs.noop, on_end=ends)
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.submit("other", pool_jobs.noop, on_end=ends)
    assert pool.join(10) and ends.one().ok


# -- batches ------------------------------------------------------------------------------------

def by_key(ends: list[JobEnd]) -> dict[object, JobEnd]:
    found = {end.key: end for end in ends}
    assert len(found) == len(ends), "a key ended twice"
    return found


@pytest.mark.timeout(20)
def test_a_batch_ends_each_call_once_in_order_as_it_returns(make_pool):
    pool = make_pool(1)
    ends = Ends()
    calls = [Call(("b", i), pool_jobs.double, (i,)) for i in range(5)]
    calls[2] = Call(("b", 2), pool_jobs.fail, ("bad two",))
    calls[3] = Call(("b", 3), pool_jobs.unpicklable_result)
    pool.submit_batch(calls, on_end=ends)
    got = ends.wait(5)
    assert [end.key for end in got] == [("b", i) for i in range(5)]
    assert [end.value for end in got if end.ok] == [0, 2, 8]
    assert (got[2].error_type, got[2].error_message) == ("ValueError", "bad two")
    assert got[3].error_type == "MaybeEncodingError" and "could not be sent" in got[3].error_message
    assert all(end.started is not None for end in got)
    assert [end.duration is not None for end in got] == [True, True, True, False, True]
    assert [end.started for end in got] == sorted(end.started for end in got)
    assert pool.pending() == 0 and pool.running() == {}
    time.sleep(0.1)
    assert len(ends.ends) == 5


@pytest.mark.timeout(20)
def test_a_call_ends_before_the_rest_of_its_batch_runs(make_pool):
    pool = make_pool(1)
    ends = Ends()
    pool.submit_batch([Call("quick", pool_jobs.double, (1,)), Call("slow", pool_jobs.sleep, (1.0,))],
                      on_end=ends)
    assert ends.one(timeout=0.8).key == "quick"
    assert pool.pending() == 1 and running_pid(pool, "slow") in pool.pids()
    assert ends.wait(2)[1].value == 1.0


@pytest.mark.timeout(20)
def test_a_batch_rejects_repeated_or_pending_keys(make_pool):
    pool = make_pool()
    ends = Ends()
    with pytest.raises(ValueError, match="same key twice"):
        pool.submit_batch([Call("a", pool_jobs.noop), Call("a", pool_jobs.noop)], on_end=ends)
    pool.submit("busy", pool_jobs.sleep, (0.2,), on_end=ends)
    with pytest.raises(ValueError, match="not ended"):
        pool.submit_batch([Call("b", pool_jobs.noop), Call("busy", pool_jobs.noop)], on_end=ends)
    assert ends.one().key == "busy" and pool.pending() == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_a_child_lost_mid_batch_fails_only_its_running_call(make_pool, how):
    """Calls that returned keep their results; the running one is WorkerLost; the ones after
    it never started, so they run again, in another child, and end normally."""
    pool = make_pool(2)
    ends = Ends()
    victim = Call("victim", pool_jobs.sleep, (30,)) if how == "sigkill" else Call("victim", pool_jobs.os_exit, (3,))
    calls = [Call("before", pool_jobs.double, (1,)), victim,
             *(Call(("after", i), pool_jobs.double, (i,)) for i in range(3))]
    pool.submit_batch(calls, on_end=ends)
    if how == "sigkill":
        os.kill(running_pid(pool, "victim"), signal.SIGKILL)
    found = by_key(ends.wait(5))
    assert found["before"].ok and found["before"].value == 2
    assert (found["victim"].ok, found["victim"].error_type) == (False, "WorkerLost")
    assert found["victim"].started is not None
    assert [found[("after", i)].value for i in range(3)] == [0, 2, 4]
    time.sleep(0.2)
    assert len(ends.ends) == 5 and pool.pending() == 0


@pytest.mark.timeout(30)
def test_a_closed_pool_ends_the_unstarted_calls_of_a_lost_batch_as_not_started(make_pool):
    pool = make_pool(1)
    ends = Ends()
    pool.submit_batch([Call("victim", pool_jobs.sleep, (30,)), Call("next", pool_jobs.noop)],
                      on_end=ends)
    pid = running_pid(pool, "victim")
    pool.close()
    os.kill(pid, signal.SIGKILL)
    found = by_key(ends.wait(2))
    assert found["victim"].error_type == "WorkerLost"
    assert found["next"].error_type == "NotStarted" and "not started" in found["next"].error_message
    assert found["next"].started is None or found["next"].started <= time.time()
    assert pool.join(10)


# -- deaths -------------------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_sigkill_of_a_busy_child_is_worker_lost_within_a_second(make_pool):
    pool = make_pool(2)
    ends = Ends()
    pool.submit("victim", pool_jobs.sleep, (30,), on_end=ends)
    pid = running_pid(pool, "victim")
    old_pids = pool.pids()
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    end = ends.one(timeout=5)
    assert end.ended - killed < 1.0
    assert (end.ok, end.error_type) == (False, "WorkerLost")
    assert end.error_message == f"worker lost: pid {pid} exited with signal SIGKILL"
    assert end.started is not None and pool.pending() == 0
    assert_back_to_full_strength(pool, 2, old_pids)


@pytest.mark.timeout(20)
def test_os_exit_in_fn_is_worker_lost(make_pool):
    pool = make_pool(1)
    old_pids = pool.pids()
    end = run_one(pool, pool_jobs.os_exit, 3)
    assert end.error_type == "WorkerLost"
    assert end.error_message.endswith("exited with exit code 3")
    assert_back_to_full_strength(pool, 1, old_pids)


@pytest.mark.timeout(20)
def test_segfault_in_fn_is_worker_lost(make_pool):
    pool = make_pool(1)
    old_pids = pool.pids()
    end = run_one(pool, pool_jobs.segfault)
    assert end.error_type == "WorkerLost"
    assert end.error_message.endswith("exited with signal SIGSEGV")
    assert_back_to_full_strength(pool, 1, old_pids)


def proc_state(pid: int) -> str | None:
    """Linux: the one-letter state in /proc/<pid>/stat; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def idle(pid: int) -> bool:
    """The child sleeps in the kernel, i.e. waits for a task (always True off Linux)."""
    return proc_state(pid) in ("S", None) if sys.platform.startswith("linux") else True


def kill_idle_children(pool: WorkerPool, procs: int) -> None:
    pids = set(pool.pids())
    wait_until(lambda: all(idle(pid) for pid in pids), 5, "the children to be idle")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: pool.live_children() == procs and not set(pool.pids()) & pids, 5,
               "the pool to replace its killed children")


@pytest.mark.timeout(20)
def test_sigkill_of_idle_children_does_not_wedge_the_pool(make_pool):
    """cpython#96062: a stock SimpleQueue reader blocks *holding* the queue lock; killed there,
    it keeps the lock forever and no child can take a task again (this test then times out)."""
    pool = make_pool(2)
    ends = Ends()
    for i in range(4):
        pool.submit(("warm", i), pool_jobs.noop, on_end=ends)
    ends.wait(4)
    for _ in range(3):
        kill_idle_children(pool, 2)
    ends = Ends()
    for i in range(10):
        pool.submit(("after", i), pool_jobs.double, (i,), on_end=ends)
    assert sorted(end.value for end in ends.wait(10, timeout=10)) == [2 * i for i in range(10)]


@pytest.mark.timeout(30)
def test_children_that_die_at_start_are_replaced_ever_more_slowly(caplog):
    """Pool replaces a dead child at once; if every child dies in its initializer, that was a
    fork storm (every core busy, a traceback each time). Now each replacement waits longer."""
    caplog.set_level(logging.WARNING, logger="worker_pool.pool")
    messages = lambda: [r.getMessage() for r in caplog.records]  # noqa: E731
    started = time.monotonic()
    pool = WorkerPool(1, initializer=pool_jobs.broken_initializer)
    try:
        wait_until(lambda: any("starting the next in 0.80s" in m for m in messages()), 20,
                   "the wait between replacements to double up to 0.8 s")
        assert time.monotonic() - started >= 0.05 + 0.1 + 0.2 + 0.4  # the waits so far
        assert sum("idle worker" in m for m in messages()) <= 6       # five deaths, maybe six
    finally:
        started = time.monotonic()
        pool.terminate()                 # cuts a pending wait short
        assert time.monotonic() - started < 1.5


@pytest.mark.timeout(30)
def test_a_child_that_ran_quick_jobs_and_then_died_is_replaced_at_once(make_pool, caplog):
    """Its start reports are read after its quick jobs ended; it still counts as having taken
    them, so its death is not mistaken for a failed start."""
    caplog.set_level(logging.WARNING, logger="worker_pool.pool")
    pool = make_pool(1)
    for death in (1, 2):  # a wrong wait would show from the second replacement on
        old_pids = pool.pids()
        for _ in range(5):
            assert run_one(pool, pool_jobs.noop).ok
        assert run_one(pool, pool_jobs.exit_later, 3, 0.2).ok
        wait_until(lambda: sum("exited with exit code 3" in r.getMessage() for r in caplog.records) == death,
                   10, "the idle child's exit to be noticed")
        assert_back_to_full_strength(pool, 1, old_pids)
    assert not any("children die before taking a job" in r.getMessage() for r in caplog.records)


# -- time limits --------------------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_hard_time_limit_terminates_the_child(make_pool):
    pool = make_pool(2)
    old_pids = pool.pids()
    end = run_one(pool, pool_jobs.sleep, 30, time_limit=0.3)
    assert (end.ok, end.error_type) == (False, "TimeLimitExceeded")
    assert "time limit of 0.3 s exceeded" in end.error_message
    assert end.error_message.endswith("exited with signal SIGTERM")
    assert 0.3 <= end.ended - end.started < 1.5
    assert_back_to_full_strength(pool, 2, old_pids)


@pytest.mark.timeout(20)
def test_hard_time_limit_kills_a_child_that_ignores_sigterm(make_pool):
    pool = make_pool(1, kill_grace=0.4)
    old_pids = pool.pids()
    end = run_one(pool, pool_jobs.sleep_ignoring_sigterm, 30, time_limit=0.2)
    assert end.error_type == "TimeLimitExceeded"
    assert end.error_message.endswith("exited with signal SIGKILL")
    assert 0.6 <= end.ended - end.started < 2.0
    assert_back_to_full_strength(pool, 1, old_pids)


@pytest.mark.timeout(20)
def test_hard_time_limit_holds_while_other_jobs_keep_starting(make_pool):
    """The watchdog lets start reports pile up before reading them (REPORT_PAUSE); a steady
    stream of them must not put off a time limit that falls due meanwhile."""
    pool = make_pool(2)
    limited = Ends()
    pool.submit("limited", pool_jobs.sleep, (30,), on_end=limited, time_limit=0.3)
    running_pid(pool, "limited")
    quick = Ends()
    started = 0
    while not limited.ends:  # one quick job after another on the other child
        pool.submit(("quick", started), pool_jobs.noop, on_end=quick)
        started += 1
        quick.wait(started)
    end = limited.one()
    assert end.error_type == "TimeLimitExceeded"
    assert 0.3 <= end.ended - end.started < 1.0
    assert started > 20


@pytest.mark.timeout(20)
def test_job_within_its_time_limit_is_not_touched(make_pool):
    pool = make_pool(1)
    pid = pool.pids()[0]
    assert run_one(pool, pool_jobs.sleep, 0.1, time_limit=5).ok
    assert run_one(pool, pool_jobs.sleep, 0.3).ok  # SIGTERM stays harmless between jobs
    assert pool.pids() == [pid]


@pytest.mark.timeout(20)
def test_children_ignore_sigint_and_sigterm_between_jobs(make_pool):
    """The parent owns Ctrl-C; SIGTERM only acts while a job's function runs."""
    pool = make_pool(1)
    ends = Ends()
    pool.submit("busy", pool_jobs.sleep, (0.3,), on_end=ends)
    pid = running_pid(pool, "busy")
    os.kill(pid, signal.SIGINT)
    assert ends.one().ok
    os.kill(pid, signal.SIGTERM)  # idle now
    assert run_one(pool, pool_jobs.double, 3).value == 6
    assert pool.pids() == [pid]


@pytest.mark.timeout(20)
def test_soft_time_limit_raises_inside_fn(make_pool):
    pool = make_pool(1)
    end = run_one(pool, pool_jobs.sleep, 30, soft_time_limit=0.2)
    assert (end.ok, end.error_type) == (False, "SoftTimeLimitExceeded")
    assert "in sleep" in end.traceback
    end = run_one(pool, pool_jobs.sleep_and_clean_up, 30, soft_time_limit=0.2)
    assert (end.ok, end.value) == (True, "cleaned up")
    # a job that beats its soft limit leaves no timer behind for the next job in that child
    assert run_one(pool, pool_jobs.sleep, 0.05, soft_time_limit=0.2).ok
    end = run_one(pool, pool_jobs.sleep_and_clean_up, 0.4)
    assert (end.ok, end.value) == (True, "not interrupted")


# -- callbacks and races -----------------------------------------------------------------------

@pytest.mark.timeout(20)
def test_on_end_that_raises_is_logged_and_the_pool_goes_on(make_pool, caplog):
    pool = make_pool(2)

    def bad_on_end(end: JobEnd) -> None:
        raise RuntimeError("callback bug")

    for i in range(3):
        pool.submit(("bad", i), pool_jobs.noop, on_end=bad_on_end)
    assert pool.join(10)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert len(errors) == 3 and "callback bug" in str(errors[0].exc_info[1])
    assert run_one(pool, pool_jobs.double, 2).value == 4


@pytest.mark.timeout(40)
def test_every_job_ends_exactly_once_under_kills_and_time_limits(make_pool):
    """Results, deaths and time limits race; each job still ends once, with a sane outcome."""
    pool = make_pool(2, kill_grace=0.1)
    ends = Ends()
    rng = random.Random(1234)
    count = 400
    stop = threading.Event()

    def killer() -> None:
        krng = random.Random(5678)
        while not stop.wait(krng.uniform(0.02, 0.1)):
            pids = pool.pids()
            if pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(krng.choice(pids), signal.SIGKILL)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        for i in range(count):
            seconds = rng.choice([0, 0, 0.001, 0.005, 0.02])
            pool.submit(i, pool_jobs.sleep, (seconds,), on_end=ends,
                        time_limit=rng.choice([None, 0.005, 0.02]))
        assert pool.join(30)
    finally:
        stop.set()
        thread.join()
    seen = Counter(end.key for end in ends.wait(count))
    assert len(ends.ends) == count and set(seen) == set(range(count))
    kinds = Counter(end.error_type for end in ends.ends)
    assert set(kinds) <= {"", "WorkerLost", "TimeLimitExceeded"}, kinds
    assert kinds[""] > count // 4, kinds
    assert pool.pending() == 0


@pytest.mark.timeout(20)
def test_close_and_join_deliver_every_real_result(make_pool):
    """After close(), children exit on Pool's stop sentinel right after their last result:
    those exits must not turn finished jobs into WorkerLost."""
    pool = make_pool(2)
    ends = Ends()
    for i in range(200):
        pool.submit(i, pool_jobs.double, (i,), on_end=ends)
    pool.close()
    assert pool.join(15)
    assert sorted(end.value for end in ends.wait(200)) == [2 * i for i in range(200)]
    wait_until(lambda: pool.live_children() == 0, 5, "the children to exit after close()")


@pytest.mark.timeout(30)
def test_large_results_from_concurrent_children_arrive_intact(make_pool):
    pool = make_pool(2)
    ends = Ends()
    size = 300_000
    for seed in range(24):
        pool.submit(seed, pool_jobs.pattern, (seed, size), on_end=ends)
    for end in ends.wait(24, timeout=20):
        assert end.ok and end.value == pool_jobs.pattern(end.key, size)


@pytest.mark.timeout(30)
def test_tasks_keep_their_order_when_the_pipe_fills_and_empties(make_pool):
    # Submissions are written by the caller while the task pipe has room, and by Pool's task
    # handler thread once it is full; a busy single child sees them all in submission order.
    pool = make_pool(1)
    ends = Ends()
    pool.submit("busy", pool_jobs.sleep, (0.3,), on_end=ends)
    burst = pool._pool._inqueue._slots + 50 if pool._pool._inqueue._slots else 300
    for i in range(burst):
        pool.submit(i, pool_jobs.double, (i,), on_end=ends)
    assert pool._pool._handed_off > 0 or not pool._pool._inqueue._slots  # the pipe did fill
    ends.wait(burst + 1, timeout=20)
    for i in range(burst, burst + 20):  # and direct writes resume, behind the handler's
        pool.submit(i, pool_jobs.double, (i,), on_end=ends)
    got = ends.wait(burst + 21, timeout=20)
    assert [end.key for end in got] == ["busy", *range(burst + 20)]
    assert all(end.ok and end.value == 2 * end.key for end in got[1:])
    assert pool._pool._handed_off == 0


@pytest.mark.timeout(20)
def test_big_arguments_travel_through_a_spill_file(make_pool):
    pool = make_pool(2)
    ends = Ends()
    payloads = {seed: pool_jobs.pattern(seed, 200_000) for seed in range(6)}
    for seed, payload in payloads.items():
        pool.submit(seed, pool_jobs.checksum, (payload,), on_end=ends)
    for end in ends.wait(6):
        assert end.ok and end.value == pool_jobs.checksum(payloads[end.key])
    spill_dir = pool._pool._inqueue._spill_dir
    assert spill_dir is not None and os.listdir(spill_dir) == []


@linux_only
@pytest.mark.timeout(20)
def test_parent_threads_and_sockets_do_not_leak_into_children(make_pool):
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait)
    busy.start()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        st_sock = os.fstat(listener.fileno())
        try:
            pool = make_pool(2)
            end = run_one(pool, pool_jobs.open_file_ids)
        finally:
            stop.set()
            busy.join()
    assert end.ok
    assert (st_sock.st_dev, st_sock.st_ino) not in end.value


@pytest.mark.timeout(20)
def test_terminate_kills_children_and_drops_unended_jobs(make_pool):
    pool = make_pool(2)
    ends = Ends()
    pool.submit("long", pool_jobs.sleep_ignoring_sigterm, (30,), on_end=ends)
    running_pid(pool, "long")
    pids = pool.pids()
    pool.terminate()
    pool.terminate()
    assert pool.live_children() == 0
    if sys.platform.startswith("linux"):
        wait_until(lambda: all(proc_state(pid) in (None, "Z") for pid in pids), 5,
                   "the children to die")
    assert ends.ends == [] and pool.pending() == 0
    assert not pool.join(0)
    with pytest.raises(ValueError):
        pool.submit("late", pool_jobs.noop, on_end=ends)


# -- the task ledger, in one process: a "dead reader" here is a read with no start report --------

@pytest.fixture
def task_queue() -> Iterator[TaskQueue]:
    report_in, report_out = multiprocessing.Pipe(duplex=False)
    queue = TaskQueue(ctx=multiprocessing.get_context("spawn"), report=report_out)
    yield queue
    queue.remove_spill_dir()
    queue.close()
    report_in.close()
    report_out.close()


def put_tasks(queue: TaskQueue, jobs: list[int]) -> None:
    for job in jobs:
        queue.put((job, 0, pool_jobs.double, (job,), {}))


@pytest.mark.timeout(10)
def test_a_report_that_skips_jobs_names_them_lost(task_queue):
    put_tasks(task_queue, [10, 11, 12, 13])
    task_queue.discard_one()                  # job 10: its reader dies before reporting
    task_queue.discard_one()                  # job 11: taken and reported
    assert task_queue.taken(11) == [10]
    task_queue.discard_one()                  # job 12: taken and reported
    assert task_queue.taken(12) == []


@pytest.mark.timeout(10)
def test_the_audit_finds_a_job_taken_without_a_report(task_queue):
    put_tasks(task_queue, [20, 21])
    task_queue.put(None)                      # Pool's stop sentinel: never reported, never lost
    task_queue.put((22, 0, pool_jobs.checksum, (b"x" * 50_000,), {}))  # spilled
    put_tasks(task_queue, [23])
    with task_queue.frozen(timeout=1) as frozen:
        assert frozen and task_queue.unreported_takes() == []
    task_queue.discard_one()                  # job 20, reported
    assert task_queue.taken(20) == []
    for _ in range(3):                        # job 21, the sentinel and job 22: readers die
        task_queue.discard_one()
    with task_queue.frozen(timeout=1) as frozen:
        assert frozen and task_queue.unreported_takes() == [21, 22]
        assert task_queue.unreported_takes() == []
    task_queue.discard_one()
    assert task_queue.taken(23) == []


@pytest.mark.timeout(10)
def test_the_audit_does_not_wait_for_a_writer_blocked_on_a_full_pipe(task_queue):
    """The watchdog audits while holding the pool's lock; waiting there for the task handler,
    which keeps the put lock while a full pipe blocks its write, would stall every job end."""
    with task_queue._put_lock:                # the writer, as if blocked mid-write
        started = time.monotonic()
        with task_queue.frozen(timeout=1) as frozen:
            assert not frozen
        assert time.monotonic() - started < 0.5
    with task_queue.frozen(timeout=1) as frozen:
        assert frozen


# -- the result pipe's framing, in one process ---------------------------------------------------

def frames(pid: int, payload: bytes) -> list[bytes]:
    chunks = [payload[i:i + FRAME_BODY] for i in range(0, len(payload), FRAME_BODY)] or [b""]
    return [FRAME.pack(pid, (FIRST if i == 0 else 0) | (LAST if i == len(chunks) - 1 else 0)) + c
            for i, c in enumerate(chunks)]


@pytest.mark.timeout(30)
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 3 * FRAME_BODY), min_size=1, max_size=3),
       truncated=st.integers(1, 2 * FRAME_BODY), order=st.randoms(use_true_random=False))
def test_result_frames_from_many_writers_reassemble(sizes, truncated, order):
    """Frames of different writers interleave; a writer that died mid-message is dropped."""

    queue = ResultQueue(ctx=multiprocessing.get_context("spawn"))
    try:
        messages = {pid: pickle.dumps(pool_jobs.pattern(pid, size)) for pid, size in
                    enumerate(sizes, start=100)}
        streams = [frames(pid, data) for pid, data in messages.items()]
        dead = frames(7, pickle.dumps(b"x" * truncated))[:-1]  # its writer died before the end
        streams.append(dead + frames(7, pickle.dumps("after restart")))
        wire: list[bytes] = []
        while any(streams):
            stream = order.choice([s for s in streams if s])
            wire.append(stream.pop(0))
        assert sum(map(len, wire)) < 60_000  # fits in the pipe: no reader thread needed
        for frame in wire:
            queue._writer.send_bytes(frame)
        expected = [pool_jobs.pattern(pid, size) for pid, size in enumerate(sizes, start=100)]
        got = [queue.get() for _ in range(len(expected) + 1)]
        assert sorted(got, key=repr) == sorted(expected + ["after restart"], key=repr)
    finally:
        queue.close()


@pytest.mark.timeout(30)
def test_results_arrive_whole_and_in_order_when_reads_end_inside_frames():
    """The reader takes up to READ_AHEAD bytes per read, so reads end inside frames; a writer
    thread keeps the pipe full while the reader takes everything in order."""
    queue = ResultQueue(ctx=multiprocessing.get_context("spawn"))
    sizes = [random.Random(i).randrange(0, 3 * FRAME_BODY) for i in range(400)]
    assert sum(sizes) > 4 * READ_AHEAD
    writer = threading.Thread(target=lambda: [queue.put((i, b"v" * size)) for i, size in enumerate(sizes)])
    writer.start()
    try:
        assert [queue.get() for _ in sizes] == [(i, b"v" * size) for i, size in enumerate(sizes)]
    finally:
        writer.join()
        queue.close()


class _Registered:
    """Picklable only through the reducer the test registers."""

    def __reduce__(self):
        raise TypeError("needs its registered reducer")


def test_a_reducer_registered_after_import_is_used_by_the_queues():
    ForkingPickler.register(_Registered, lambda obj: (str, ("via reducer",)))
    try:
        assert pickle.loads(dumps([_Registered()])) == ["via reducer"]
    finally:
        del ForkingPickler._extra_reducers[_Registered]
