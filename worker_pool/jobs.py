"""The value objects of ``worker_pool``: how a job ended, and the pool's record of a job."""
from __future__ import annotations

import multiprocessing.pool
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobEnd:
    """How one submitted job ended; handed to its ``on_end`` exactly once."""
    key: Hashable          # the caller's key for the job, as given to submit()
    ok: bool
    value: Any             # fn's return value when ok, else None
    error_type: str        # "" if ok; the remote exception's class, WorkerLost, TimeLimitExceeded
    error_message: str
    traceback: str         # remote traceback text ("" when ok or when there is none)
    started: float | None  # time.time() when the child took the job; None if it never did
    ended: float           # time.time() when the end was noticed


class WorkerLost(Exception):
    """The child running the job died before sending a result."""


class TimeLimitExceeded(Exception):
    """The job ran past its hard time limit and its child was killed."""


@dataclass(eq=False)
class Job:
    """The pool's record of one submitted job, from submit() until it ends (internal)."""
    key: Hashable
    on_end: Callable[[JobEnd], None]
    time_limit: float | None
    seq: int = -1                    # Pool's job id, also the id in the child's start report
    result: multiprocessing.pool.ApplyResult | None = None
    pid: int | None = None
    started: float | None = None
    deadline: float | None = None    # time.monotonic() at which the hard limit fires
    term_sent: float | None = None   # time.monotonic() of the SIGTERM
    kill_sent: bool = False
