"""When the dispatcher hands a child several tasks as one Pool job (``WorkerPool.submit_batch``).

A Pool job costs the dispatcher's one busy thread about 15 us (record, pickle, a write, a start
report) and the child about as much again. For a task that runs for microseconds that overhead
is most of the work, and the dispatcher's thread is what bounds a drain. So when a fetch brings
more tasks than the children can start at once (only with ``--prefetch``), short tasks go to the
pool in batches. A batch is run by one child, in order; each task still ends, and is recorded,
on its own, and a child lost mid-batch fails only the task it was running (see
``worker_pool.pool``).

What a batch gives up is work stealing: tasks behind a slow one in its batch wait for it even if
another child is idle, and a task that hangs holds up the rest of its batch until it returns. So
a task joins a batch only when its name has been seen to run briefly (under half the budget),
every time lately:

* ``recent`` is a decaying maximum of the name's run times: one slow run stops batching that
  name until quick runs have brought it down again, by 10% each (about 65 runs after a 1 s
  outlier). A name never seen, and a task whose child was lost, count as slow;
* a batch holds at most ``budget`` seconds of such work (``--batch-budget``, 2 ms by default; 0
  turns batching off), MAX_BATCH tasks, and a share of the fetch that leaves every child about
  two batches;
* tasks with a hard time limit never join one: the limit is enforced by killing the child.

At ``--prefetch 0`` a fetch never brings more than the idle children can start, so nothing is
batched and no child is ever handed a second task.
"""
from __future__ import annotations

import math

MAX_BATCH = 16   # also keeps most batches' pickles under PIPE_BUF (4 KiB): not spilled to a file
DECAY = 0.9      # each run of a name lowers its recent maximum by this factor at most
LOST = 1.0       # what a task whose child was lost counts as: slow, for a while


class Batcher:
    """Per task name, how long its runs took lately; from that, how big a batch may be."""

    def __init__(self, procs: int, budget: float) -> None:
        self._procs = procs
        self._budget = budget
        self._recent: dict[str, float] = {}

    def observe(self, name: str, seconds: float | None) -> None:
        """One run of ``name`` ended; ``None``: it has no run time (its child was lost)."""
        took = LOST if seconds is None else seconds
        self._recent[name] = max(took, self._recent.get(name, 0.0) * DECAY)

    def size(self, name: str, fetched: int) -> int:
        """The most tasks named ``name`` that may share a batch, in a fetch of ``fetched``."""
        recent = self._recent.get(name)
        if recent is None or fetched <= self._procs:
            return 1
        share = math.ceil(fetched / (2 * self._procs))
        return max(1, min(MAX_BATCH, share, int(self._budget / max(recent, 1e-6))))
