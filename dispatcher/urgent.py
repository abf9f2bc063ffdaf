"""High tasks go first even past tasks already handed to the pool (only with --prefetch).

With ``--prefetch``, tasks wait in the pool's queue, first in first out, for whichever child frees
first. A high task fetched after them would start only after all of them, and one pushed while
they wait only after the loop's next refill: with slow tasks, many seconds. So there is a bar in
memory shared with the children:

* each child keeps a wait on the high list open on a connection of its own (``Peek``: BLMOVE
  onto itself, which consumes nothing). Before a task that is not high, it looks whether the
  reply has come, without waiting: if it has, a high task was pushed, and the child raises the bar;
* while the bar is up, the loop fetches high tasks only, as soon as a slot is free, and lowers it
  once a fetch takes fewer than it asked for;
* a high task that has to wait behind others in the pool holds the bar up until a child takes
  it (or it ends some other way: a lost child);
* a child about to run a task that is not high looks at the bar first: while it is up, the child
  hands the task back unrun (``YieldedToHighTask``) and the loop puts it back at the head of its
  list. That frees its slot, so the high task is fetched, and it is the next one a child takes.

Why the child looks for itself: it is the one about to start a task, and it is running already.
A watcher process that raised the bar for the children had to be woken and scheduled first, 0.1
to 0.3 ms on two busy cores and sometimes 3, while children started dozens of short tasks. A
look at the child's own socket is one ``poll`` call, and it sees the push as soon as Redis has
written the reply.

What it does not do: stop a task already running; keep the order of tasks handed back at
different moments (each goes back to the head of its list as it comes back), nor keep them
ahead of lower-priority tasks fetched along with the high one; or beat a task that starts before
Redis's reply reaches the children (it writes its append-only file first: tens of microseconds),
or one already on its way to a child. A high task that is retried or was enqueued with a delay
reaches its list inside a fetch, not by a push: it waits for the next refill. Tasks handed back
cost about what short tasks cost, so past HAND_BACK_BUDGET a second the lane pauses until the
second is over.
"""
from __future__ import annotations

import logging
import os
import pickle
import select
import time
from collections.abc import Hashable
from typing import Any
from multiprocessing.context import BaseContext

import redis

from dispatcher.store import REDIS_DOWN
from dispatcher.waiters import Waiter
from worker_pool import Declined

logger = logging.getLogger(__name__)

# A task handed back costs the loop, Redis and a child about what a short task costs. With
# high tasks pushed often among short ones, every push would hand back the whole prefetch: past
# this many a second, the lane pauses until the second is over, and high tasks wait their turn
# in the pool like the others. Slow tasks are handed back far more rarely than that.
HAND_BACK_BUDGET = 500

# A child's look may connect, or read a reply, at a task's start: it must never hold the task
# up for long (it reads only once poll says a reply has come, so this bounds every wait)
PEEK_TIMEOUT = 0.5
PEEK_RETRY_FIRST = 0.05
PEEK_RETRY_MAX = 1.0  # longest pause between a child's tries while Redis is unreachable
PEEK_ERRORS = (redis.RedisError, OSError, ValueError)  # not the task's own (a soft time limit)

# The shared values; the ring of marks starts at TAKEN
RAISED, WAIT_FOR, PAUSED_UNTIL, SEEN, TAKEN = range(5)


class YieldedToHighTask(Declined):
    """A task handed back unrun by its child because a high task waits (never an error)."""


class Bar:
    """The shared part: set up before the pool starts, handed to each child by its initializer.

    RAISED is raised by the children, from what their looks saw, and lowered by the loop. One
    push answers every child's wait, and a child reads its reply only at its next task, maybe
    long after: SEEN counts the high tasks the loop has fetched, and its lowerings of the bar. A
    reply to a wait sent before the latest of them may be about a task already taken, so the
    child asks Redis first (LLEN, one round trip) and raises the bar only if a high task is
    there. What is left: a raise racing a lowering or a fetch, or a push that another
    dispatcher's fetch took. Then the bar is up with no high task left in Redis, and the loop's
    next fetch takes fewer than it asked for and lowers it again, at the cost of a task or two
    handed back. A raise lost to a lowering comes again at the next look of a child that saw
    the push, through that round trip. WAIT_FOR, the number of the high task the bar waits for
    (0: none), PAUSED_UNTIL (the end of a pause of the lane, by the monotonic clock, which all
    processes of a machine share on Linux and macOS) and SEEN are written by the loop only. A child taking high
    task n writes n in mark n % size of a ring, unless a newer number is there. No lock: a lock
    held by a child killed mid-task would stop every other child for good. The ring is more than
    twice as long as the pool's queue, so the mark of a task still in it is never overwritten by
    a newer one.
    """

    def __init__(self, ctx: BaseContext, slots: int) -> None:
        self._ring = 2 * slots + 2
        self._values = ctx.RawArray("q", TAKEN + self._ring)

    # -- in a child, before each task ----------------------------------------------------------

    def must_yield(self) -> bool:
        """Before a task that is not high: is a high task waiting, in Redis or in the pool?"""
        values = self._values
        if values[RAISED]:
            return True
        waited = values[WAIT_FOR]
        return bool(waited) and values[TAKEN + waited % self._ring] != waited

    def taken(self, number: int) -> None:
        """Before high task ``number``: the tasks queued behind it need not wait for it."""
        index = TAKEN + number % self._ring
        if self._values[index] < number:  # a late write never brings an older number back
            self._values[index] = number

    def raise_(self) -> None:
        self._values[RAISED] = 1

    @property
    def paused(self) -> bool:
        until = self._values[PAUSED_UNTIL]
        return bool(until) and time.monotonic_ns() < until

    @property
    def seen(self) -> int:
        return self._values[SEEN]

    # -- in the dispatcher -------------------------------------------------------------------

    @property
    def raised(self) -> bool:
        return bool(self._values[RAISED])

    def lower(self) -> None:
        self._values[RAISED] = 0
        self._values[SEEN] += 1

    def high_fetched(self) -> None:
        self._values[SEEN] += 1

    def wait_for(self, number: int) -> None:
        self._values[WAIT_FOR] = number

    def pause_until(self, monotonic_ns: int) -> None:
        self._values[PAUSED_UNTIL] = monotonic_ns


class Peek:
    """In a child: a non-consuming wait on the high list, kept open on a connection of its own
    (``waiters.Waiter``, as the loop's), and looked at without waiting.

    Built in the dispatcher, from what a new process can be given; it connects in the child, as
    the child starts (``Lookout.connect``). It never raises into the task it looks for (but the
    task's own exceptions: its soft time limit may fire during a look), and each step that can
    wait (a connect, per address; a reply) is bounded by PEEK_TIMEOUT; a name lookup is not.
    While Redis is unreachable it tries again at most every PEEK_RETRY_MAX seconds, at a task's
    start, and in between it sees nothing (against a host that drops packets, a child with
    short tasks spends up to a third of its time connecting while that lasts). Each push answers the wait
    of every child, and Redis logs each answer as an LMOVE in its append-only file.
    """

    def __init__(self, client: redis.Redis, key: str) -> None:
        pool = client.connection_pool
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if _travels(k, v)}
        for timeout in ("socket_connect_timeout", "socket_timeout"):
            kwargs[timeout] = min(kwargs.get(timeout) or PEEK_TIMEOUT, PEEK_TIMEOUT)
        self._pool_args = (pool.connection_class, kwargs)
        self._key = key
        self._waiter: Waiter | None = None
        self._poll: select.poll | None = None
        self._fd: int | None = None
        self._retry_at = 0.0
        self._delay = PEEK_RETRY_FIRST
        self._sent_seen = 0  # the bar's SEEN when the wait was sent
        self._warned = False  # in this run of failures

    def pushed(self, seen: int) -> bool:
        """Was a high task pushed since the wait was sent, and none fetched since (``seen``:
        the bar's SEEN now)? After it says so, the next look sends the wait again: call it
        only with the bar down."""
        try:
            return self._look(seen)
        except PEEK_ERRORS as exc:  # never into the task it looks for
            self._broke(exc)
            return False
        except BaseException:  # the task's own (its soft time limit), maybe mid-handshake
            if self._waiter is not None:
                self._waiter.close()  # a reply half read would be taken for the next one's
            raise

    def _look(self, seen: int) -> bool:
        waiter = self._waiter
        fd = None if waiter is None else waiter.fileno()
        if fd is None:
            self._arm(seen)
            return False
        if fd != self._fd:  # a new connection
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
            self._fd = fd
        if not self._poll.poll(0):
            if waiter.drop_if_overdue(time.monotonic()) and waiter.fileno() is None:
                self._broke(waiter.error)  # reconnecting failed
            return False
        got = waiter.read()
        if got is None or (got is False and waiter.fileno() is None):  # broke, or not sent again
            self._broke(waiter.error)
            return False
        self._delay = PEEK_RETRY_FIRST
        self._warned = False
        if not got:  # an empty block: read() sent the wait again
            self._sent_seen = seen
            return False
        # A reply to a wait sent before the latest fetch of a high task may be about that one:
        # ask Redis (one round trip, after a push only)
        waiting = seen == self._sent_seen or waiter.length() > 0
        self._arm(seen)  # at once: the next push must be seen at the next look, not the one after
        return waiting

    def _arm(self, seen: int) -> None:
        if time.monotonic() < self._retry_at:
            return
        if self._waiter is None:
            connection_class, kwargs = self._pool_args
            pool = redis.ConnectionPool(connection_class=connection_class, **kwargs)
            self._waiter = Waiter(redis.Redis(connection_pool=pool), self._key)
        self._waiter.arm()
        if self._waiter.fileno() is None:
            self._broke(self._waiter.error)
        self._sent_seen = seen

    def _broke(self, why: Exception | None) -> None:
        """See nothing for a while. Redis away comes and goes (the dispatcher says so); any
        other failure (a password, an ACL) may last, and keeps the lane off in this child: the
        first of a run of them is a warning."""
        lasting = isinstance(why, (redis.AuthenticationError, redis.ResponseError)) or (
            why is not None and not isinstance(why, REDIS_DOWN))
        level = logging.WARNING if lasting and not self._warned else logging.DEBUG
        self._warned = self._warned or lasting
        logger.log(level, "child %d cannot look at %s for high tasks (%s); trying again in %.2fs",
                   os.getpid(), self._key, why, self._delay)
        if self._waiter is not None:
            self._waiter.close()
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(PEEK_RETRY_MAX, self._delay * 2)


def _travels(name: str, value: Any) -> bool:
    """Can this connection setting be given to a child? Plain values can. Of the objects, only
    a credential provider: without it a child's look is refused (its lane stays off, with a
    warning) while the loop's own connection logs in. Others (pool handlers holding locks,
    sentinels compared by identity) would not survive the copy, and the look does without them."""
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        return True
    if name != "credential_provider":
        return False
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 -- any reason it cannot be copied: the look goes without it
        logger.warning("the children cannot be given this client's credential provider (%s): "
                       "their look at the high list will try without it", type(value).__name__)
        return False
    return True


class Lookout:
    """A child's side of the lane: the bar, and the child's own look at the high list."""

    def __init__(self, bar: Bar, peek: Peek) -> None:
        self.bar = bar
        self._peek = peek

    def connect(self) -> None:
        """In the child, as it starts: connect and send the wait now, not at its first task."""
        self._peek.pushed(self.bar.seen)

    def must_yield(self) -> bool:
        """Before a task that is not high: hand it back? Raises the bar on a push it sees."""
        bar = self.bar
        if bar.must_yield():
            return True
        if bar.paused or not self._peek.pushed(bar.seen):
            return False
        bar.raise_()
        return True


class HighLane:
    """The loop's side: the bar, and the numbers of the high tasks it hands to the pool (off
    without --prefetch: then no task waits in the pool to be passed).

    The bar waits for the newest high task that waits behind others in the pool. High tasks go
    to the pool one job each, never in a batch, so a child takes one as it starts it. The queue
    is first in, first out, so once a child has taken that one, every high task before it has
    been started too. When it ends, however it ends (a lost child, too), the bar waits for none:
    one that never reached a child cannot hold the others back.
    """

    def __init__(self, ctx: BaseContext, slots: int, procs: int, high_queue: str, on: bool) -> None:
        self.bar = Bar(ctx, slots)
        self._on = on
        self._procs = procs
        self._high = high_queue
        self._count = 0                     # numbers handed out; never reused
        self._newest: Hashable | None = None
        self._window_end = 0                # the budget's second (monotonic ns), from the first
        self._handed_back = 0               # task handed back in it; and how many since

    @property
    def raised(self) -> bool:
        """A high task waits in Redis: the loop fetches it, and only it, for any free slot."""
        return self.bar.raised

    def mark(self, key: Hashable, queue: str, in_pool: int) -> int:
        """run()'s last argument for a task the loop hands to the pool (``in_pool`` counts it):
        0 for a task that is not high, -1 for a high one that need not wait, else its number."""
        if queue != self._high:
            return 0
        self.fetched(queue)
        if not self._on or in_pool <= self._procs or self.bar.paused:
            return -1  # it starts at once (or the next task is taken after it anyway)
        self._count += 1
        self._newest = key
        self.bar.wait_for(self._count)
        return self._count

    def fetched(self, queue: str) -> None:
        """A task came from ``queue`` (mark() says so for those that run; a dead letter, too):
        a child's reply about a high task pushed before this may be stale (Bar's SEEN)."""
        if queue == self._high and self._on:
            self.bar.high_fetched()

    def ended(self, key: Hashable) -> None:
        if key == self._newest:
            self._newest = None
            self.bar.wait_for(0)

    def handed_back(self) -> None:
        """A task came back unrun: count it against the budget. A pause ends by the clock: the
        children see that themselves, even while the loop sleeps."""
        now = time.monotonic_ns()
        if now >= self._window_end:
            self._window_end, self._handed_back = now + 1_000_000_000, 0
        self._handed_back += 1
        if self._handed_back == HAND_BACK_BUDGET:
            # Let go of what holds tasks back now, too: nothing is handed back until it is over
            self.bar.pause_until(self._window_end)
            self._newest = None
            self.bar.wait_for(0)
            self.give_up()
            logger.debug("%d tasks handed back for high ones this second: high tasks wait their "
                         "turn in the pool until it is over", HAND_BACK_BUDGET)

    def after_fetch(self, raised: bool, taken: int, most: int) -> None:
        """After a fetch with the bar ``raised`` that took ``taken`` of ``most``, once its tasks
        are in the pool (so the bar already waits for its high tasks): lower the bar if no high
        task is left in Redis."""
        if raised and taken < most:
            self.bar.lower()

    def give_up(self) -> None:
        """Lower the bar: no high task is left in Redis, or Redis is unreachable and no fetch
        can take it, so let the children run the rest."""
        if self.bar.raised:
            self.bar.lower()
