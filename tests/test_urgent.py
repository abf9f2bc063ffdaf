"""The high lane (dispatcher.urgent): the bar the children look at, the loop's record of high
tasks in the pool, and the watcher process against a real server."""
from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from dispatcher.store import connect
from dispatcher.urgent import Bar, HighTasks
from dispatcher.waiters import Watch, _watch
from procs import wait_for

CTX = multiprocessing.get_context("forkserver")


def test_the_bar_holds_other_tasks_while_a_high_one_waits_in_redis_or_in_the_pool():
    bar = Bar(CTX, slots=3)
    assert not bar.must_yield()
    bar.raise_()
    assert bar.raised and bar.must_yield()
    bar.lower()
    highs = HighTasks(bar)
    assert highs.handed("a") == 1 and highs.handed("b") == 2
    assert bar.must_yield()                     # the newest, b, not taken yet
    bar.taken(2)
    bar.taken(1)                                # taken out of order by another child: no matter
    assert not bar.must_yield()
    highs.handed("c")
    bar.taken(3 + 8)                            # a mark in the same place of the ring, not c's
    assert bar.must_yield()


def test_a_high_task_that_ends_untaken_holds_nothing_back_and_numbers_are_never_reused():
    bar = Bar(CTX, slots=3)
    highs = HighTasks(bar)
    highs.handed("a")
    highs.handed("b")                           # lost with its child, never taken
    highs.ended("a")                            # not the newest: b is still waited for
    assert bar.must_yield()
    highs.ended("b")
    assert not bar.must_yield()
    highs.ended("unknown")
    assert highs.handed("a") == 3 and bar.must_yield()


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
        os.kill(watch._process.pid, signal.SIGKILL)
        watch._process.join(5)
        watch.lower(watch_again=True)                          # a new watcher, which sees h1 at once
        wait_for(lambda: bar.raised, 10, what="the bar raised by the new watcher")
    finally:
        watch.close()


def test_the_watcher_process_ends_when_its_dispatcher_is_gone():
    gone = CTX.Process(target=os.getpid)
    gone.start()
    gone.join()
    asks, ask = CTX.Pipe(duplex=False)
    ask.send_bytes(b"")
    # Returns at once, having opened no connection (nothing listens on port 1)
    _watch(type(connect("redis://127.0.0.1:1/0").connection_pool.make_connection()),
           {"host": "127.0.0.1", "port": 1}, "t:high", Bar(CTX, 1), asks, gone.pid)
