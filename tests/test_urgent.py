"""The high lane (dispatcher.urgent): the bar the children look at, the loop's record of high
tasks in the pool, and a child's own look at the high list against a real server."""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import time

import pytest
import redis
from redis.credentials import UsernamePasswordCredentialProvider

from dispatcher import urgent
from dispatcher.store import connect
from dispatcher.urgent import HAND_BACK_BUDGET, HighLane, Lookout, Peek
from procs import wait_for
from worker_pool import SoftTimeLimitExceeded

CTX = multiprocessing.get_context("forkserver")


def _lane(procs: int = 1, on: bool = True) -> HighLane:
    return HighLane(CTX, slots=3, procs=procs, high_queue="t:high", on=on)  # on: with --prefetch


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
    lane = _lane(procs=2, on=False)                         # --prefetch 0: nothing is ever queued
    assert lane.mark("b", "t:high", in_pool=9) == -1 and not lane.bar.must_yield()


def test_every_high_task_fetched_counts_as_seen_even_a_dead_letter():
    lane = _lane()
    lane.mark("a", "t:high", in_pool=1)
    lane.fetched("t:high")                                  # one that could not run
    lane.mark("x", "t:low", in_pool=2)
    lane.fetched("t:low")
    assert lane.bar.seen == 2


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


class _Saw:
    def __init__(self, push: bool = False) -> None:
        self.push = push

    def pushed(self, seen: int) -> bool:
        return self.push


def test_a_child_raises_the_bar_on_a_push_it_sees_unless_the_lane_is_paused():
    lane = _lane()
    saw = _Saw()
    lookout = Lookout(lane.bar, saw)
    assert not lookout.must_yield()
    saw.push = True
    lane.bar.pause_until(time.monotonic_ns() + 60 * 10**9)
    assert not lookout.must_yield() and not lane.raised
    lane.bar.pause_until(0)
    assert lookout.must_yield() and lane.raised
    saw.push = False
    assert lookout.must_yield()                                 # until the loop lowers it
    lane.after_fetch(True, 2, 2)                                # it took all it asked for: more
    assert lane.raised                                          # may wait
    lane.after_fetch(True, 1, 2)
    assert not lane.raised and not lookout.must_yield()


@pytest.mark.timeout(30)
def test_a_childs_look_sees_a_push_as_soon_as_it_is_made_and_consumes_nothing(redis_url, r):
    peek = Peek(connect(redis_url, retries=0), "t:high")
    assert not peek.pushed(0)                                   # the first look sends the wait
    wait_for(lambda: _blocked(r) == 1, 10, what="the look waiting on the list")
    assert not peek.pushed(0)
    r.lpush("t:high", b"h1")
    wait_for(lambda: peek.pushed(0), 10, what="the push seen")
    assert r.lrange("t:high", 0, -1) == [b"h1"]                 # nothing consumed
    wait_for(lambda: peek.pushed(0), 10, what="h1 seen again")  # the wait was sent again


@pytest.mark.timeout(30)
def test_one_push_raises_the_bar_once_though_every_child_sees_it(redis_url, r):
    """A reply read after the loop fetched a high task, or lowered the bar, may be about a task
    already taken: it does not raise the bar again (one raise per child would hand back tasks
    for nothing, one round after another)."""
    lane = _lane(procs=2)
    lookouts = [Lookout(lane.bar, Peek(connect(redis_url, retries=0), "t:high")) for _ in range(3)]
    for lookout in lookouts:
        lookout.connect()
    wait_for(lambda: _blocked(r) == 3, 10, what="three looks waiting on the list")
    r.lpush("t:high", b"h1")
    wait_for(lookouts[0].must_yield, 10, what="the push seen")
    wait_for(lambda: _answered(lookouts[0]), 10, what="its wait, sent again, answered: h1 is there")
    r.rpop("t:high")                                            # the loop fetches h1 ...
    lane.mark("h1", "t:high", in_pool=1)
    lane.after_fetch(True, 1, 5)                                # ... and lowers the bar
    assert not lane.raised
    wait_for(lambda: _blocked(r) == 0, 10, what="every wait answered")
    for lookout in lookouts[1:]:                                # their replies were about h1:
        assert not lookout.must_yield() and not lane.raised     # they send their waits again
    wait_for(lambda: _blocked(r) == 2, 10, what="the others' waits sent again")
    r.lpush("t:high", b"h2")
    wait_for(lookouts[1].must_yield, 10, what="a new push seen")


@pytest.mark.timeout(30)
def test_a_push_made_after_the_bar_was_lowered_is_seen_at_the_next_look(redis_url, r):
    """A child whose reply came before the loop fetched and lowered the bar asks Redis itself:
    a high task pushed since must not wait for the look after."""
    lane = _lane(procs=2)
    first, second = (Lookout(lane.bar, Peek(connect(redis_url, retries=0), "t:high")) for _ in range(2))
    first.connect()
    second.connect()
    wait_for(lambda: _blocked(r) == 2, 10, what="two looks waiting on the list")
    r.lpush("t:high", b"h0")
    wait_for(first.must_yield, 10, what="the push seen")
    wait_for(lambda: _answered(first), 10, what="its wait, sent again, answered: h0 is there")
    r.rpop("t:high")                                            # the loop fetches h0 ...
    lane.mark("h0", "t:high", in_pool=1)
    lane.after_fetch(True, 1, 5)                                # ... and lowers the bar
    wait_for(lambda: _blocked(r) == 0, 10, what="every wait answered")
    r.lpush("t:high", b"h1")
    assert second.must_yield() and lane.raised
    assert first._peek.pushed(lane.bar.seen)                    # the one that raised the bar, too


@pytest.mark.timeout(30)
def test_a_look_whose_link_breaks_connects_again_and_never_raises(redis_url, r):
    peek = Peek(connect(redis_url, retries=0), "t:high")
    peek.pushed(0)
    wait_for(lambda: _blocked(r) == 1, 10, what="the look waiting on the list")
    r.client_kill_filter(_id=next(c["id"] for c in r.client_list() if c["cmd"] == "blmove"))
    wait_for(lambda: not peek.pushed(0) and not _blocked(r) and peek._retry_at > 0, 10,
             what="the broken link noticed")
    r.lpush("t:high", b"h1")
    wait_for(lambda: peek.pushed(0), 10, what="the push seen on a new connection")


@pytest.mark.timeout(30)
def test_a_look_logs_in_with_the_clients_credential_provider(redis_url, r):
    """An embedding may log in with a credential provider rather than a URL's password: the
    children, which get the look as a copy, must log in the same way."""
    r.acl_setuser("looker", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"])
    r.acl_setuser("default", enabled=True, commands=["-blmove"])  # a look without the provider fails
    try:
        where = r.connection_pool.connection_kwargs
        client = redis.Redis(host=where["host"], port=where["port"], credential_provider=UsernamePasswordCredentialProvider("looker", "pw"))
        peek = pickle.loads(pickle.dumps(Peek(client, "t:high")))  # as a child gets it
        wait_for(lambda: not peek.pushed(0) and _blocked(r) == 1, 10, what="the look waiting on the list")
        r.lpush("t:high", b"h1")
        wait_for(lambda: peek.pushed(0), 10, what="the push seen")
    finally:
        r.acl_setuser("default", enabled=True, commands=["+blmove"])
        r.acl_deluser("looker")


@pytest.mark.timeout(30)
def test_a_look_refused_by_redis_says_so_once_as_a_warning(redis_url, r, caplog):
    """A password or an ACL that refuses the look keeps the lane off in that child until it is
    mended: unlike Redis away, nothing else in the dispatcher would say so."""
    caplog.set_level(logging.DEBUG, logger=urgent.__name__)
    r.acl_setuser("nolook", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-blmove"])
    try:
        url = redis_url.replace("redis://", "redis://nolook:pw@")
        peek = Peek(connect(url, retries=0), "t:high")
        def refusals() -> list[str]:
            return [rec.levelname for rec in caplog.records if "cannot look" in rec.getMessage()]

        def look_again() -> bool:
            peek._retry_at = 0                                  # no need to wait for the retry
            assert not peek.pushed(0)
            return len(refusals()) >= 3
        wait_for(look_again, 10, what="three refusals")
        assert refusals()[:3] == ["WARNING", "DEBUG", "DEBUG"]
    finally:
        r.acl_deluser("nolook")


def test_a_look_at_an_unreachable_redis_sees_nothing_and_waits_before_it_tries_again():
    peek = Peek(connect("redis://127.0.0.1:1/0", retries=0), "t:high")  # nothing listens there
    assert not peek.pushed(0)
    assert peek._retry_at > time.monotonic()                    # not a connect at every task
    assert not peek.pushed(0)


def test_a_look_lets_the_tasks_own_exceptions_through():
    """The soft time limit's alarm may fire during a look: swallowed, the task would run on
    with no limit."""
    peek = Peek(connect("redis://127.0.0.1:1/0", retries=0), "t:high")

    def alarm(seen: int) -> bool:
        raise SoftTimeLimitExceeded("soft limit")
    peek._look = alarm
    with pytest.raises(SoftTimeLimitExceeded):
        peek.pushed(0)


def _answered(lookout: Lookout) -> bool:
    """The reply to the wait its look sent is in the socket (read at its next look)."""
    return bool(lookout._peek._poll.poll(0))


def _blocked(r) -> int:
    return sum("b" in c["flags"] for c in r.client_list())  # "cmd" is the last command, served or not


def test_past_the_hand_back_budget_the_lane_pauses_for_the_rest_of_the_second(monkeypatch):
    """The pause ends by the clock, which the children read themselves: a loop asleep (every
    slot busy with slow tasks) need not wake to end it."""
    clock = [100 * 10**9]
    monkeypatch.setattr(urgent.time, "monotonic_ns", lambda: clock[0])
    lane = _lane()
    lane.mark("h", "t:high", in_pool=5)
    lane.bar.raise_()
    for _ in range(HAND_BACK_BUDGET - 1):
        lane.handed_back()
    assert not lane.bar.paused and lane.bar.must_yield()
    lane.handed_back()
    assert lane.bar.paused and not lane.bar.must_yield()        # nothing held back any more,
    assert lane.mark("a", "t:high", in_pool=5) == -1            # nor waits for a high task, and
    assert not Lookout(lane.bar, _Saw(push=True)).must_yield()  # children raise the bar no more
    clock[0] += 5 * 10**8
    assert lane.bar.paused
    clock[0] += 5 * 10**8                                       # the second is over
    assert not lane.bar.paused and lane.mark("b", "t:high", in_pool=5) > 0
    lane.handed_back()                                          # a new second begins
    assert not lane.bar.paused
