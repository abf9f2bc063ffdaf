"""A ``multiprocessing.Pool`` wrapper that never leaks a job: every submitted job ends exactly once.

Generic: it knows nothing about Redis or the dispatcher. See ``worker_pool.pool`` for the
mechanism and its known windows.
"""
from worker_pool.child import Declined, SoftTimeLimitExceeded
from worker_pool.jobs import Call, JobEnd, NotStarted, TimeLimitExceeded, WorkerLost
from worker_pool.pool import WorkerPool

__all__ = ["Call", "Declined", "JobEnd", "NotStarted", "SoftTimeLimitExceeded", "TimeLimitExceeded", "WorkerLost", "WorkerPool"]
