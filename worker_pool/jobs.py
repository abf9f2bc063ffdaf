"""The value objects of ``worker_pool``: how a job ended, and the pool's record of a job."""
from __future__ import annotations

import multiprocessing.pool
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple


class Call(NamedTuple):
    """One call for ``WorkerPool.submit_batch``; ``key`` names its end, as in ``submit``."""
    key: Hashable
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict | None = None
    soft_time_limit: float | None = None


class JobEnd(NamedTuple):
    """How one submitted job ended; handed to its ``on_end`` exactly once. A named tuple, not a
    frozen dataclass: one is built per job, and it builds in a quarter of the time."""
    key: Hashable          # the caller's key for the job, as given to submit()
    ok: bool
    value: Any             # fn's return value when ok, else None
    error_type: str        # "" if ok; the remote exception's class, WorkerLost, TimeLimitExceeded
    error_message: str
    traceback: str         # remote traceback text ("" when ok or when there is none)
    started: float | None  # time.time() when the function started (for a call lost or not
    #                        started in a batch: when the call before it ended); None if the
    #                        job never reached a child
    ended: float           # time.time() when the end was noticed
    duration: float | None = None  # seconds the function ran, by the child's clock; None if
    #                                it never ran, its child was lost, or its result was unsendable


class WorkerLost(Exception):
    """The child running the job died before sending a result."""


class NotStarted(Exception):
    """The call never started: its batch's child was lost before reaching it, and it could not
    be queued again (the pool was closed)."""


class TimeLimitExceeded(Exception):
    """The job ran past its hard time limit and its child was killed."""


@dataclass(eq=False)
class Job:
    """The pool's record of one Pool job -- a single call or a batch -- from submission until
    its last call ends (internal). A batch's calls run, and end, in order."""
    calls: list[Call]
    on_end: Callable[[JobEnd], None]
    time_limit: float | None
    ended: int = 0                   # how many of the calls have ended: calls[ended] is next
    seq: int = -1                    # Pool's job id, also the id in the child's start report
    result: multiprocessing.pool.ApplyResult | None = None
    pid: int | None = None
    started: float | None = None     # when the child took the job, then when its latest call ended
    deadline: float | None = None    # time.monotonic() at which the hard limit fires
    term_sent: float | None = None   # time.monotonic() of the SIGTERM
    kill_sent: bool = False

    @property
    def key(self) -> Hashable:
        """The key of the call that runs now (or would run next)."""
        return self.calls[min(self.ended, len(self.calls) - 1)].key
