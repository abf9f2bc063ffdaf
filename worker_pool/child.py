"""Code that runs inside the pool's child processes.

A child is a stock ``multiprocessing.pool`` worker; this module adds what the parent needs to
trust it:

* ``init_child`` (the Pool initializer) makes the parent own the signals: SIGINT is ignored for
  good, SIGTERM is ignored except while a job's function runs. A hard time limit's SIGTERM can
  therefore only stop a job, never a child in the middle of reading a task or writing a result
  (which would leave a queue half written). The parent's SIGKILL after the grace period, and
  ``Pool.terminate`` (which this package turns into SIGKILL), still stop any child.
* ``run_job`` wraps the caller's function: it arms the soft time limit, turns *any* exception
  into plain strings (so an exception that cannot be pickled still gets home), and records when
  the function started and how long it ran.
* ``run_batch`` runs a batch's calls in order and sends each outcome home as soon as the call
  returns, as its own result message: the parent then knows, if the child dies, which call was
  running and which had not started.

The start report ("job J taken by pid P") is written by the task queue itself, while the child
still holds the queue's read lock; see ``worker_pool.queues.TaskQueue``.
"""
from __future__ import annotations

import multiprocessing.pool
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

# (ok, value, started, seconds) or (False, (error_type, message, traceback), started, seconds)
Outcome = tuple[bool, Any, float, float]
# What run_job takes: fn, args, kwargs, soft time limit
Work = tuple[Callable[..., Any], tuple, dict, "float | None"]


class Declined(Exception):
    """Raised by a job's function that declines to run, having done nothing: the job ends with
    its error type and message, but no traceback. Formatting one costs a child about 50 us,
    twenty times what a no-op job costs, and says nothing about a refusal."""


class SoftTimeLimitExceeded(Exception):
    """Raised inside a job's function when its soft time limit expires.

    The function may catch it to clean up; if it lets it propagate, the job ends with
    ``error_type == "SoftTimeLimitExceeded"``.
    """


OWNER_POLL = 1.0  # seconds between looks at the owner where there is no pidfd

# True only while the job's function runs: the SIGALRM handler raises only then, and at most
# once per job (it clears the flag itself), so the exception can never escape run_job's
# bookkeeping and reach the Pool's worker loop.
_in_fn = False
# This child's end of the pool's result pipe, given by init_child: run_batch sends the outcome of
# each call but the last through it (Pool's own worker loop sends the last, as for any job).
_results: Any = None


def _on_alarm(signum: int, frame: Any) -> None:
    global _in_fn
    if _in_fn:
        _in_fn = False
        raise SoftTimeLimitExceeded("soft time limit exceeded")


def init_child(results: Any, owner: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    """Pool initializer: die with the pool's owner, set the signal policy, then call the
    caller's initializer."""
    global _results
    _results = results
    _die_with_owner(owner)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    if initializer is not None:
        initializer(*initargs)


def _die_with_owner(owner: int) -> None:
    """Kill this child when the pool's owner ends. Without it, a child of a SIGKILLed owner ran
    its job to the end (hours maybe, past any time limit) beside the restarted owner's run of
    the same task. The kernel's "kill me when my parent dies" does not do it: under forkserver
    the parent is the fork server, which every child keeps alive. So a thread waits on the
    owner, on a pidfd (Linux 5.3+: no wake-up until it ends), else by a look every
    OWNER_POLL seconds."""
    try:
        fd: int | None = os.pidfd_open(owner)
    except ProcessLookupError:  # it ended before this child started
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd here
        fd = None
    threading.Thread(target=_watch_owner, args=(owner, fd), name="owner-watch", daemon=True).start()


def _watch_owner(owner: int, fd: int | None) -> None:
    # Signals are for the main thread: one this thread took (the soft time limit's SIGALRM)
    # would not interrupt the job's blocking call, so the limit would fire late
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    if fd is not None:
        select.select([fd], [], [])  # readable once the owner has ended
    else:
        while _alive(owner):
            time.sleep(OWNER_POLL)
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, as another user: the child may have dropped privileges
        return True
    return True


def run_job(fn: Callable[..., Any], args: tuple, kwargs: dict, soft_limit: float | None) -> Outcome:
    """Run ``fn`` under the job's signal policy; never raises (except by the child's death).

    Exceptions travel home as strings rather than objects: an exception class that cannot be
    pickled or rebuilt in the parent would otherwise turn into a confusing secondary error.
    """
    global _in_fn
    started = time.time()
    clock = time.perf_counter()
    try:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a hard time limit may stop fn
            _in_fn = True
            if soft_limit is not None:
                signal.setitimer(signal.ITIMER_REAL, soft_limit)
            value = fn(*args, **kwargs)
        finally:
            # An alarm that fires before this line raises (and is caught below); after it,
            # the handler stays silent.
            _in_fn = False
    except BaseException as exc:  # noqa: BLE001 -- every failure of fn is the job's result
        outcome: Outcome = (False, _describe(exc), started, time.perf_counter() - clock)
    else:
        outcome = (True, value, started, time.perf_counter() - clock)
    if soft_limit is not None:
        signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return outcome


def run_batch(job: int, calls: list[Work]) -> Outcome:
    """Run the calls in order. Each outcome but the last goes home at once, under the Pool job
    id with the call's index; the last is returned, and Pool sends it under the last index."""
    last = len(calls) - 1
    for index in range(last):
        outcome = run_job(*calls[index])
        try:
            _results.put((job, index, (True, outcome)))
        except Exception as exc:  # noqa: BLE001 -- an unpicklable value fails its own call only
            _results.put((job, index, (False, multiprocessing.pool.MaybeEncodingError(exc, outcome[1]))))
    return run_job(*calls[last])


def _describe(exc: BaseException) -> tuple[str, str, str]:
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 -- a broken __str__ must not hide the original error
        message = f"<unprintable {type(exc).__name__}>"
    if isinstance(exc, Declined):
        return type(exc).__name__, message, ""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return type(exc).__name__, message, text
