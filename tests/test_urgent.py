"""The high lane (dispatcher.urgent): the bar the children look at, the loop's record of high
tasks in the pool, and the watcher process against a real server."""
from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from dispatcher.execute import run
from dispatcher.store import connect
from dispatcher import urgent
from dispatcher.urgent import HAND_BACK_BUDGET, Bar, HighLane, marked
from worker_pool import Call
from dispatcher.waiters import Watch, _watch
from procs import wait_for

CTX = multiprocessing.get_context("forkserver")


class _Watcher:
    def __init__(self) -> None:
        self.watching = False
        self.asked = 0

    def want(self) -> None:
        self.asked += 1
        self.watching = True

    def replace_if_gone(self) -> None:
        pass


def _lane(procs: int = 1) -> HighLane:
    lane = HighLane(CTX, slots=3, procs=procs, high_queue="t:high")
    lane.watch = _Watcher()  # as with --prefetch
    return lane


def test_the_bar_holds_other_tasks_while_a_high_one_waits_in_redis_or_in_the_pool():
    lane = _lane()
    bar = lane.bar
    assert not bar.must_yield()
    bar.raise_()
    assert lane.raised and bar.must_yield()
    bar.lower()
    assert lane.mark("a", "t:high", in_pool=2) == 1 and lane.mark("b", "t:high", in_pool=3) == 2
    assert bar.must_yield()                     # the newest, b, not taken yet
    bar.taken(2)
    bar.taken(1)                                # taken out of order by another child: no matter
    assert not bar.must_yield()
    lane.mark("c", "t:high", in_pool=3)
    bar.taken(3 + 8)                            # a mark in the same place of the ring, not c's
    assert bar.must_yield()
    bar.taken(3)
    assert bar.must_yield()                     # 11 is newer: a late 3 does not overwrite it


def test_only_a_high_task_that_waits_behind_others_holds_them_back():
    lane = _lane(procs=2)
    assert lane.mark("x", "t:low", in_pool=9) == 0
    assert lane.mark("a", "t:high", in_pool=2) == -1        # a child is free for it
    assert not lane.bar.must_yield()
    lane.watch = None                                       # --prefetch 0: nothing is ever queued
    assert lane.mark("b", "t:high", in_pool=9) == -1 and not lane.bar.must_yield()


def test_a_high_task_that_ends_untaken_holds_nothing_back_and_numbers_are_never_reused():
    lane = _lane()
    lane.mark("a", "t:high", in_pool=2)
    lane.mark("b", "t:high", in_pool=3)         # lost with its child, never taken
    lane.ended("a")                             # not the newest: b is still waited for
    assert lane.bar.must_yield()
    lane.ended("b")
    assert not lane.bar.must_yield()
    lane.ended("unknown")
    assert lane.mark("a", "t:high", in_pool=2) == 3 and lane.bar.must_yield()


@pytest.mark.timeout(30)
def test_the_watcher_raises_the_bar_once_per_ask_and_is_replaced_if_killed(redis_url, r):
    bar = Bar(CTX, slots=3)
    watch = Watch(connect(redis_url, retries=0), "t:high", bar, CTX)
    try:
        watch.want()
        r.lpush("t:high", b"h1")
        wait_for(lambda: bar.raised, 10, what="the bar raised")
        assert r.lrange("t:high", 0, -1) == [b"h1"]           # nothing consumed
        watch.lower(watch_again=False)
        assert not watch.watching
        _kill(watch)
        watch.lower(watch_again=True)                          # a new watcher, which sees h1 at once
        wait_for(lambda: bar.raised, 10, what="the bar raised by the new watcher")
        r.delete("t:high")
        watch.lower(watch_again=True)
        wait_for(lambda: _blocked(r), 10, what="the watcher blocked on the list")
        _kill(watch)                                           # killed while watching: the loop's
        watch.replace_if_gone()                                # check replaces it, and asks again
        r.lpush("t:high", b"h2")
        wait_for(lambda: bar.raised, 10, what="the bar raised by the third watcher")
    finally:
        watch.close()


def _blocked(r) -> bool:
    return any(c["cmd"] == "blmove" for c in r.client_list())


def _kill(watch: Watch) -> None:
    os.kill(watch._process.pid, signal.SIGKILL)
    watch._process.join(5)


@pytest.mark.timeout(30)
def test_a_forked_watcher_ends_on_sigterm_though_it_inherits_a_handler(redis_url, r):
    ctx = multiprocessing.get_context("fork")
    before = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # as the dispatcher's
    try:
        watch = Watch(connect(redis_url, retries=0), "t:high", Bar(ctx, slots=3), ctx)
        watch.want()
        wait_for(lambda: _blocked(r), 10, what="the watcher blocked on the list")
        watch._process.terminate()                  # what multiprocessing does at exit, too
        watch._process.join(5)
        assert not watch._process.is_alive()
        watch.close()
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_watcher_process_ends_when_its_dispatcher_is_gone():
    gone = CTX.Process(target=os.getpid)
    gone.start()
    gone.join()
    asks, ask = CTX.Pipe(duplex=False)
    ask.send_bytes(b"")
    # Returns at once, having opened no connection (nothing listens on port 1)
    _watch(type(connect("redis://127.0.0.1:1/0").connection_pool.make_connection()),
           {"host": "127.0.0.1", "port": 1}, "t:high", Bar(CTX, 1), asks, gone.pid)


def test_a_batch_marks_its_newest_high_task_when_its_child_takes_it():
    def call(slot: int, high: int) -> Call:
        return Call(slot, run, ("t.x", (), {}, f"id{slot}", "json", False, high))
    batch = [call(0, 4), call(1, 5), call(2, 0)]                # high 4 and 5, then a low task
    first = marked(batch)
    assert [c.args[-1] for c in first] == [5, -1, 0]            # 5 is written once, when taken
    assert marked(batch[2:]) == batch[2:]                      # nothing high: unchanged
    unnumbered = [call(0, -1), call(1, 0)]                      # high with nothing waiting for it
    assert marked(unnumbered) == unnumbered
    assert [c.args[-1] for c in marked([call(0, -1), call(1, 7)])] == [7, -1]


def test_past_the_hand_back_budget_the_lane_pauses_for_the_rest_of_the_second(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(urgent.time, "monotonic", lambda: clock[0])
    lane = _lane()
    lane.after_fetch(False, 1, 5, ["t:low"], lambda: [])
    assert lane.watch.asked == 1                                # it holds a low task: watch
    lane.watch.watching = False                                 # (the watcher fired since)
    for _ in range(HAND_BACK_BUDGET):
        lane.handed_back()
    assert lane.mark("a", "t:high", in_pool=5) == -1            # paused: nothing waits for it
    lane.after_fetch(False, 1, 5, ["t:low"], lambda: [])
    assert lane.watch.asked == 1
    clock[0] += 1.0                                             # the second is over
    assert lane.mark("b", "t:high", in_pool=5) > 0
    lane.check(lambda: ["t:high", "t:low"])                     # no fetch needed: it still holds
    assert lane.watch.asked == 2                                # a low task, so it watches again


@pytest.mark.timeout(30)
def test_a_watcher_that_cannot_be_started_again_is_logged_and_tried_later(redis_url, caplog):
    watch = Watch(connect(redis_url, retries=0), "t:high", Bar(CTX, slots=3), CTX)
    try:
        _kill(watch)
        real = watch._ctx

        class NoProcesses:
            def Process(self, *args, **kwargs):  # noqa: N802 -- the context's own name
                raise OSError(11, "Resource temporarily unavailable")
        watch._ctx = NoProcesses()
        watch.want()                                           # does not raise into the loop
        assert "could not start a watcher" in caplog.text and watch.watching
        watch._ctx = real
        watch.replace_if_gone()                                # the next check starts one
        assert watch._process.is_alive()
    finally:
        watch.close()
