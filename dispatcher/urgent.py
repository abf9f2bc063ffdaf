"""High tasks go first even past tasks already handed to the pool (only with --prefetch).

With ``--prefetch``, tasks wait in the pool's queue, first in first out, for whichever child frees
first. A high task fetched after them would start only after all of them, and one pushed while
they wait only after the loop's next refill: with slow tasks, many seconds. So there is a bar in
memory shared with the children:

* a watcher process (``waiters.Watch``), asked by the loop once it has taken tasks that are not
  high, blocks on the high list and raises the bar the moment a high task is pushed; the loop
  then fetches high tasks only, as soon as a slot is free, lowers the bar once a fetch takes
  fewer than it asked for, and asks again if it still holds tasks that are not high;
* a high task that has to wait behind others in the pool holds the bar up until a child takes
  it (or it ends some other way: a lost child);
* a child about to run a task that is not high looks at the bar first: while it is up, the child
  hands the task back unrun (``YieldedToHighTask``) and the loop puts it back at the head of its
  list. That frees its slot, so the high task is fetched, and it is the next one a child takes.

What it does not do: stop a task already running; keep the order of tasks handed back at
different moments (each goes back to the head of its list as it comes back), nor keep them
ahead of lower-priority tasks fetched along with the high one; or beat a task already on its
way to a child when the watcher sees the push, 0.1 to 0.3 ms after it on two busy cores. A
high task that is retried or was enqueued with a delay reaches its list inside a fetch, not by
a push: it waits for the next refill. Tasks handed back cost about what short tasks cost, so
past HAND_BACK_BUDGET a second the lane pauses until the second is over.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable
from multiprocessing.context import BaseContext
from typing import Protocol

from worker_pool import Call

logger = logging.getLogger(__name__)

# A task handed back costs the loop, Redis and a child about what a short task costs. With
# high tasks pushed often among short ones, every push would hand back the whole prefetch: past
# this many a second, the lane pauses until the second is over, and high tasks wait their turn
# in the pool like the others. Slow tasks are handed back far more rarely than that.
HAND_BACK_BUDGET = 500

RAISED, WAIT_FOR, TAKEN = range(3)  # the shared values; TAKEN is where the ring of marks starts


class YieldedToHighTask(Exception):
    """A task handed back unrun by its child because a high task waits (never an error)."""


class Bar:
    """The shared part: set up before the pool starts, handed to each child by its initializer.

    RAISED is written by the dispatcher's side only: its watcher raises it, then waits to be
    asked again, which the loop does only after lowering it, so the two never race. WAIT_FOR,
    the number of the high task the bar waits for (0: none), is written by the loop only. A
    child taking high task n writes n in mark n % size of a ring, unless a newer number is
    there. No value has two writers that could race, so no lock: a lock held by a child killed
    mid-task would stop every other child for good. The ring is more than twice as long as the
    pool's queue, so the mark of a task still in it is never overwritten by a newer one.
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

    # -- in the dispatcher -------------------------------------------------------------------

    @property
    def raised(self) -> bool:
        return bool(self._values[RAISED])

    def raise_(self) -> None:
        self._values[RAISED] = 1

    def lower(self) -> None:
        self._values[RAISED] = 0

    def wait_for(self, number: int) -> None:
        self._values[WAIT_FOR] = number


class Watcher(Protocol):
    """What the lane needs of its watcher (``waiters.Watch``; it lives there, with Redis)."""

    watching: bool

    def want(self) -> None: ...
    def lower(self, watch_again: bool) -> None: ...
    def replace_if_gone(self) -> None: ...
    def close(self) -> None: ...


class HighLane:
    """The loop's side: the bar, the numbers of the high tasks it hands to the pool, and the
    watcher (None without --prefetch: then no task waits in the pool to be passed).

    The bar waits for the newest high task that waits behind others in the pool. The queue is
    first in, first out, so once a child has taken that one, every high task before it has been
    taken too (but for the unstarted calls of a batch whose child died, which go to the back of
    the queue again). When it ends, however it ends (a lost child, too), the bar waits for
    none: one that never reached a child cannot hold the others back.
    """

    def __init__(self, ctx: BaseContext, slots: int, procs: int, high_queue: str) -> None:
        self.bar = Bar(ctx, slots)
        self.watch: Watcher | None = None  # set once the pool runs
        self._procs = procs
        self._high = high_queue
        self._count = 0                     # numbers handed out; never reused
        self._newest: Hashable | None = None
        self._window_end = 0.0              # the current second of the hand-back budget
        self._handed_back = 0               # tasks handed back in it
        self._next_check = 0.0

    @property
    def raised(self) -> bool:
        """A high task waits in Redis: the loop fetches it, and only it, for any free slot."""
        return self.bar.raised

    def mark(self, key: Hashable, queue: str, in_pool: int) -> int:
        """run()'s last argument for a task the loop hands to the pool (``in_pool`` counts it):
        0 for a task that is not high, -1 for a high one that need not wait, else its number."""
        if queue != self._high:
            return 0
        if self.watch is None or in_pool <= self._procs or self._paused():
            return -1  # it starts at once (or the next task is taken after it anyway)
        self._count += 1
        self._newest = key
        self.bar.wait_for(self._count)
        return self._count

    def ended(self, key: Hashable) -> None:
        if key == self._newest:
            self._newest = None
            self.bar.wait_for(0)

    def check(self, held: Callable[[], Iterable[str]]) -> None:
        """Called by the loop every turn; at most once a second: replace a watcher that died,
        and ask it to watch if it should and does not (after a pause of the lane, say)."""
        watch = self.watch
        if watch is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + 1.0
        watch.replace_if_gone()
        if not watch.watching and not self.raised and self._worth_watching(held()):
            watch.want()

    def handed_back(self) -> None:
        """A task came back unrun: count it against the budget."""
        now = time.monotonic()
        if now >= self._window_end:
            self._window_end, self._handed_back = now + 1.0, 0
        self._handed_back += 1
        if self._handed_back == HAND_BACK_BUDGET:
            logger.debug("%d tasks handed back for high ones this second: high tasks wait their "
                         "turn in the pool until it is over", HAND_BACK_BUDGET)

    def _paused(self) -> bool:
        return self._handed_back >= HAND_BACK_BUDGET and time.monotonic() < self._window_end

    def after_fetch(self, raised: bool, taken: int, most: int, queues: Iterable[str],
                    held: Callable[[], Iterable[str]]) -> None:
        """After a fetch that took ``taken`` of ``most``, once its tasks are in the pool (so the
        bar already waits for its high tasks): lower the bar if no high task is left in Redis;
        ask the watcher to watch while we hold tasks a high one could pass. ``queues``: where
        each task taken came from (read only when the watcher is not watching)."""
        watch = self.watch
        if watch is None:
            return
        if raised:
            if taken < most:
                self.give_up(held)
        elif not watch.watching and self._worth_watching(queues):
            watch.want()

    def give_up(self, held: Callable[[], Iterable[str]]) -> None:
        """Lower the bar: no high task is left in Redis, or Redis is unreachable and no fetch
        can take it, so let the children run the rest. Watch again while it is worth it."""
        if self.watch is not None and self.raised:
            self.watch.lower(watch_again=self._worth_watching(held()))

    def _worth_watching(self, queues: Iterable[str]) -> bool:
        """Not paused, and some of these tasks (those we hold) could be passed by a high one."""
        return not self._paused() and any(queue != self._high for queue in queues)


def marked(batch: list[Call]) -> list[Call]:
    """A batch's first call carries the mark of the newest high task in the batch (the mark is
    the last of run()'s arguments; fetches put high tasks first, so a batch that holds any starts
    with one). The child takes them all at once: the tasks queued behind must not wait until it
    reaches the last of them, which a slow call before it could delay for good."""
    newest = max(call.args[-1] for call in batch)
    if newest <= max(0, batch[0].args[-1]):
        return batch
    # The first marks them all; the others' numbers become -1 (high, nothing to mark): a late
    # mark of its own would only be a second write of an older number
    first, rest = batch[0], batch[1:]
    return [first._replace(args=(*first.args[:-1], newest)),
            *(call._replace(args=(*call.args[:-1], -1)) if call.args[-1] > 0 else call for call in rest)]
