"""``WorkerPool``: ``multiprocessing.Pool.apply_async`` with a guaranteed end for every job.

Facts about ``multiprocessing.Pool`` (CPython 3.10-3.13) that shape this package:

* a child that dies (SIGKILL, segfault, ``os._exit``, OOM) is replaced, but its job never
  completes: neither callback fires (gh-66587);
* a callback that raises kills the result-handler thread and hangs the pool (gh-83371);
* a child killed while holding a queue lock wedges the pool (cpython#96062);
* there is no way to kill the child that runs a given job (hard time limits).

How each is handled:

* Every child reports "job J taken by pid P" while it takes J from the task pipe
  (``queues.TaskQueue``); a watchdog thread reads these reports and waits on every child's
  sentinel. When a child dies, the job it had taken fails with ``WorkerLost`` -- but only behind
  a barrier (``mp.Barrier``) sent through the result pipe, so that a child that sent its result
  and then died (as every child does on Pool's stop sentinel) has its real result delivered.
* A child killed between taking a job and reporting it is caught by the task ledger
  (``TaskQueue.taken`` / ``unreported_takes``); such a job fails with ``WorkerLost`` too.
* ``on_end`` is wrapped: whatever it raises is logged and swallowed. A lock and a dict pop make
  a second end of the same job impossible.
* Queues that a dying child cannot wedge (``queues``); ``Pool.terminate`` kills with SIGKILL.
* Hard time limits: SIGTERM to the job's child, SIGKILL ``kill_grace`` seconds later if it still
  runs that job; the job ends with ``TimeLimitExceeded`` once the child is gone.

Known windows and limits:

* Off Linux the task pipe is a byte stream: a child killed between reading a task's length and
  its body corrupts the pipe (the audit logs it). Linux uses a packet-mode pipe: no window.
* A hard time limit that fires just as its job finishes: the job ends with its result or with
  ``TimeLimitExceeded``, whichever the pool sees first, exactly once either way. If, within the
  same microseconds, that child has already started its *next* job's function, the SIGTERM
  ends that job instead (as ``WorkerLost``); between jobs children ignore SIGTERM.
* Every end goes through Pool's result-handler thread (unpicklable arguments: the task
  handler's): an ``on_end`` that blocks delays every other end, lost jobs included.
"""
from __future__ import annotations

import collections
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.pool
import os
import selectors
import signal
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
from multiprocessing.connection import Pipe, wait
from multiprocessing.process import BaseProcess
from typing import Any

from worker_pool import child
from worker_pool.jobs import Call, Job, JobEnd, NotStarted, TimeLimitExceeded, WorkerLost
from worker_pool.mp import Barrier, ProcessPool, describe_exit, send_signal
from worker_pool.queues import NO_JOB, REPORT

logger = logging.getLogger(__name__)

REAP_WAIT = 0.5  # seconds a death waits for Pool's worker handler to reap the child (exit status)
# When a start report arrives the watchdog pauses before reading, so that reports pile up and it
# does not wake once per job: at 100 jobs a second that halved its CPU. REPORT_PAUSE normally;
# SHORT_REPORT_PAUSE once a read finds BUSY_REPORTS or more, because every unread report keeps an
# entry in the task queue's ledger, and past the pipe's 256 slots ``TaskQueue.has_room`` sends
# every submission through Pool's task handler thread. What a pause delays:
# * a death that happens during it is seen when it ends (deaths seen before it are not delayed,
#   and every death then waits up to REAP_WAIT for Pool's reaper anyway);
# * a hard time limit counts from the child's own start stamp, so only limits shorter than the
#   pause are enforced late; a pause never runs past the next time-limit event.
REPORT_PAUSE = 0.025
SHORT_REPORT_PAUSE = 0.005
BUSY_REPORTS = 16
# A child that exits with an error before it ever takes a job (an initializer that fails: a task
# module that does not import) is replaced at once by Pool, which then forks as fast as it can,
# using every core and writing a traceback each time. After such a death the next child waits,
# from RESPAWN_FIRST doubling up to RESPAWN_MAX; any job's start report resets the wait. While
# Pool's worker handler waits it reaps no other child: a death mid-job is then settled after
# REAP_WAIT, a state only a pool whose children cannot start gets into.
RESPAWN_FIRST = 0.05
RESPAWN_MAX = 2.0
UNREPORTED = "a child died after taking the job, before reporting its start"


def _check_limit(seconds: float | None) -> None:
    if seconds is not None and not seconds > 0:
        raise ValueError(f"time limits must be positive, got {seconds!r}")


class WorkerPool:
    """A process pool in which every submitted job ends exactly once, whatever its child does.

    ``fn`` must be a module-level function (it is pickled by reference). ``on_end`` runs in one
    of the pool's threads and should be quick: while it runs, no other job can end.
    """

    def __init__(self, procs: int, *, initializer: Callable | None = None, initargs: tuple = (),
                 start_method: str = "forkserver", kill_grace: float = 2.0,
                 watch_interval: float = 0.1) -> None:
        if procs < 1:
            raise ValueError("procs must be at least 1")
        if kill_grace < 0 or watch_interval <= 0:
            raise ValueError("kill_grace must be >= 0 and watch_interval > 0")
        self._kill_grace = kill_grace
        self._watch_interval = watch_interval
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._jobs: dict[int, Job] = {}       # Pool job id -> job, until it ends
        self._keys: set[Hashable] = set()
        self._by_pid: dict[int, int] = {}      # pid -> id of the job it took last
        self._ending = 0                       # on_end calls in progress
        self._closed = self._terminated = False
        self._abandoned = 0
        # Watchdog state (watchdog thread only, except _unreported: under _lock)
        self._new_children: collections.deque[BaseProcess] = collections.deque()
        self._deaths: list[tuple[BaseProcess, int | None, float]] = []  # (child, job id, noticed)
        self._audit_due = False
        self._unreported: list[int] = []
        self._limit_due = time.monotonic() + watch_interval  # next time-limit event (monotonic)
        self._report_pause = REPORT_PAUSE
        self._respawn_wait = 0.0    # before the next new child (Pool's worker handler waits it)
        self._took_jobs: set[int] = set()  # pids of live children that have taken a job
        self._stop = threading.Event()
        self._barrier_ids = itertools.count()
        self._report_in, self._report_out = Pipe(duplex=False)
        self._report_buf = b""
        os.set_blocking(self._report_in.fileno(), False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._report_in, selectors.EVENT_READ, None)
        try:
            self._pool = ProcessPool(procs, child.init_child, (initializer, initargs),
                                     multiprocessing.get_context(start_method), self._report_out,
                                     self._new_children.append, self._before_new_child)
        except BaseException:
            self._selector.close()
            self._report_in.close()
            self._report_out.close()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="worker-pool-watchdog",
                                          daemon=True)
        self._watchdog.start()

    # -- public interface -------------------------------------------------------------------

    def submit(self, key: Hashable, fn: Callable, args: tuple = (), kwargs: dict | None = None,
               *, on_end: Callable[[JobEnd], None], time_limit: float | None = None,
               soft_time_limit: float | None = None) -> None:
        """Queue ``fn(*args, **kwargs)``; ``on_end`` will be called exactly once with its end.

        Raises ValueError if the pool is closed or a job with the same key has not ended yet.
        """
        _check_limit(time_limit)
        self._start(Job([Call(key, fn, args, kwargs, soft_time_limit)], on_end, time_limit))

    def submit_batch(self, calls: Sequence[Call], *, on_end: Callable[[JobEnd], None]) -> None:
        """Queue the calls as one job: one child runs them in order, and each ends (exactly once)
        as soon as it returns.

        For short calls: one task message and one start report for the lot, rather than one per
        call. The price: calls behind a slow one wait for it even if another child is free. If
        the child dies, only the call it was running ends (``WorkerLost``); the calls it had not
        started are queued again (once the pool is closed, or if that fails, they end with
        ``NotStarted``).
        Batches take no hard time limit.
        """
        if calls:
            self._start(Job(list(calls), on_end, None))

    def _start(self, job: Job) -> None:
        for call in job.calls:
            _check_limit(call.soft_time_limit)
        with self._lock:
            if self._closed:
                raise ValueError("pool is closed")
            keys = [call.key for call in job.calls]
            if len(keys) > 1 and len(set(keys)) < len(keys):
                raise ValueError(f"a batch names the same key twice: {keys!r}")
            for key in keys:
                if key in self._keys:
                    raise ValueError(f"a job with key {key!r} has not ended yet")
            self._start_locked(job)

    def _start_locked(self, job: Job) -> None:
        on_result = functools.partial(self._on_result, job)
        work = [(c.fn, c.args, {} if c.kwargs is None else c.kwargs, c.soft_time_limit)
                for c in job.calls]
        if len(work) == 1:
            job.result = self._pool.start_job(child.run_job, work[0], on_result)
        else:
            job.result = self._pool.start_job(child.run_batch, (work,), on_result,
                                              last=len(work) - 1, pass_id=True)
        job.seq = job.result._job  # type: ignore[attr-defined]
        self._jobs[job.seq] = job
        self._keys.update(call.key for call in job.calls)

    def running(self) -> dict[Hashable, tuple[int, float]]:
        """key -> (pid, started) for the jobs a child has taken and that have not ended."""
        with self._lock:
            self._read_reports()
            jobs = [(pid, self._jobs[seq]) for pid, seq in self._by_pid.items()]
        return {job.key: (pid, job.started) for pid, job in jobs if job.started is not None}

    def pending(self) -> int:
        """Submitted calls that have not ended yet (queued or running)."""
        with self._lock:
            return len(self._keys)

    def live_children(self) -> int:
        return len(self._live())

    def pids(self) -> list[int]:
        """Pids of the children currently alive."""
        return [proc.pid for proc in self._live()]

    def close(self) -> None:
        """Accept no new jobs; queued and running ones go on (and still end)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()

    def join(self, timeout: float | None) -> bool:
        """Wait until every submitted job has ended and its ``on_end`` has returned; True if
        that happened (False on timeout, or if terminate() dropped jobs). Not from on_end."""
        with self._idle:
            done = self._idle.wait_for(lambda: not self._jobs and not self._ending, timeout)
            return done and not self._abandoned

    def terminate(self) -> None:
        """Kill the children now. Jobs that had not ended get no ``on_end`` call. Idempotent."""
        with self._lock:
            if self._terminated:
                return
            self._terminated = self._closed = True
            self._abandoned = len(self._jobs)
            self._jobs.clear()
            self._keys.clear()
            self._by_pid.clear()
            self._idle.notify_all()
        self._stop.set()
        os.write(self._report_out.fileno(), REPORT.pack(NO_JOB, 0, 0.0))  # wake the watchdog
        if threading.current_thread() is not self._watchdog:
            self._watchdog.join()
        self._pool.terminate()
        self._pool._inqueue.remove_spill_dir()
        self._selector.close()
        self._report_in.close()
        self._report_out.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()

    # -- ends -------------------------------------------------------------------------------

    def _on_result(self, job: Job, index: int, ok: bool, value: Any) -> None:
        """Pool's result handler: result ``index`` of the job, which ends that call."""
        if not ok:  # Pool's own error: every call up to this one ends with it (see JobResult)
            for i in range(job.ended, index + 1):
                self._on_error(job, i, value)
            return
        fn_ok, payload, started, seconds = value
        if fn_ok:
            self._finish(job, index, True, payload, "", "", "", started, seconds)
        else:
            self._finish(job, index, False, None, *payload, started, seconds)

    def _on_error(self, job: Job, index: int, exc: BaseException) -> None:
        message = str(exc)
        if isinstance(exc, multiprocessing.pool.MaybeEncodingError):
            message = f"the job's result could not be sent to the parent: {exc.exc}"
        tb = getattr(exc.__cause__, "tb", "")  # a RemoteTraceback, if Pool wrapped one
        if not tb and exc.__traceback__ is not None:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._finish(job, index, False, None, type(exc).__name__, message, tb, None, None)

    def _finish(self, job: Job, index: int, ok: bool, value: Any, error_type: str, message: str,
                tb: str, started: float | None, seconds: float | None) -> None:
        with self._lock:
            if self._jobs.get(job.seq) is not job or index != job.ended:
                return  # already ended (or abandoned by terminate)
            if started is None and job.started is None and not ok:
                self._read_reports()  # a failed job's start report may still be unread
            if started is None:
                started = job.started  # when the child took the job, or ended the call before
            elif seconds is not None:
                job.started = started + seconds  # about when the batch's next call started
            job.ended += 1
            key = job.calls[index].key
            self._keys.discard(key)
            last = job.ended == len(job.calls)
            if last:
                del self._jobs[job.seq]
                if job.pid is not None and self._by_pid.get(job.pid) == job.seq:
                    del self._by_pid[job.pid]
            self._ending += 1
        if last:
            self._pool._inqueue.forget(job.seq)
        end = JobEnd(key, ok, value, error_type, message, tb, started, time.time(), seconds)
        try:
            job.on_end(end)
        except BaseException:  # noqa: BLE001 -- gh-83371: a raising callback hangs the pool
            logger.exception("on_end for job %r raised; ignored", key)
        finally:
            with self._lock:
                self._ending -= 1
                if not self._jobs and not self._ending:
                    self._idle.notify_all()

    def _end_lost(self, seq: int, pid: int | None, how: str) -> None:
        """Runs in the result handler, behind a barrier: the dead child's results are in. The
        call it was running fails; a batch's calls after it never started and are queued again."""
        if pid is not None:
            self._pool._outqueue.discard_partial(pid)
        with self._lock:
            job = self._jobs.get(seq)
            if job is None or job.result is None:
                return  # its result arrived before the child died
            running = job.ended
            unstarted = job.calls[running + 1:]
            if unstarted and not self._closed:
                try:  # their keys stay in self._keys, now for the new job
                    self._start_locked(Job(unstarted, job.on_end, None))
                except Exception:  # noqa: BLE001 -- they still end, as NotStarted, below
                    logger.exception("could not queue the unstarted calls of a lost batch again")
                else:
                    del job.calls[running + 1:]
                    unstarted = []
        if job.term_sent is not None:
            limit = job.time_limit
            error: Exception = TimeLimitExceeded(f"time limit of {limit:g} s exceeded: {how}")
        else:
            error = WorkerLost(f"worker lost: {how}")
        logger.warning("job %r: %s", job.calls[running].key, error)
        job.result.drop()  # type: ignore[attr-defined]
        self._on_error(job, running, error)
        for i in range(running + 1, running + 1 + len(unstarted)):  # closed, or resubmit failed
            self._on_error(job, i, NotStarted(f"not started: the child running its batch was lost "
                                              f"({how})"))

    def _fail_later(self, seq: int, pid: int | None, how: str) -> None:
        key = ("worker_pool.barrier", next(self._barrier_ids))
        Barrier.send(self._pool, key, functools.partial(self._end_lost, seq, pid, how))

    # -- watchdog ---------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch_once()
            except Exception:  # noqa: BLE001 -- the watchdog must outlive any one surprise
                logger.exception("worker pool watchdog failed; carrying on")
                self._stop.wait(self._watch_interval)

    def _watch_once(self) -> None:
        self._track_new_children()
        busy = self._deaths or self._audit_due
        events = self._selector.select(0.01 if busy else max(0.0, self._limit_due - time.monotonic()))
        dead = [key.data for key, _ in events if key.data is not None]
        if events and not dead:  # only start reports: let them pile up (see REPORT_PAUSE)
            self._stop.wait(max(0.0, min(self._report_pause, self._limit_due - time.monotonic())))
        for proc in dead:
            self._selector.unregister(proc.sentinel)
        with self._lock:
            read = self._read_reports()  # first: a dead child's last report is already in the pipe
            now = time.monotonic()
            self._deaths.extend((proc, self._by_pid.pop(proc.pid, None), now) for proc in dead)
        self._audit_due = self._audit_due or bool(dead)
        if self._audit_due:
            self._audit()
        self._settle_deaths(now)
        self._fail_unreported()
        if read:
            self._report_pause = SHORT_REPORT_PAUSE if read >= BUSY_REPORTS else REPORT_PAUSE
        now = time.monotonic()
        self._limit_due = now + self._enforce_time_limits(now)

    def _track_new_children(self) -> None:
        for _ in range(len(self._new_children)):
            proc = self._new_children.popleft()
            try:
                sentinel = proc.sentinel
            except ValueError:  # not started yet
                self._new_children.append(proc)
                continue
            self._selector.register(sentinel, selectors.EVENT_READ, proc)

    def _read_reports(self) -> int:
        """Apply every start report in the pipe; returns how many. Caller holds ``self._lock``."""
        chunk_size = REPORT.size * 512
        count = 0
        while True:
            try:
                chunk = os.read(self._report_in.fileno(), chunk_size)
            except BlockingIOError:
                return count
            data = self._report_buf + chunk
            usable = len(data) - len(data) % REPORT.size
            self._report_buf = data[usable:]
            count += usable // REPORT.size
            now, wall = time.monotonic(), time.time()
            for seq, pid, started in REPORT.iter_unpack(data[:usable]):
                if seq == NO_JOB:
                    continue  # terminate's wake-up call
                self._unreported.extend(self._pool._inqueue.taken(seq))
                self._took_jobs.add(pid)  # first: a quick job has often ended by now
                self._respawn_wait = 0.0
                job = self._jobs.get(seq)
                if job is None:
                    continue  # it ended before its report was read
                job.pid = pid
                if job.ended == 0:  # else a call's end already said when the next one started
                    job.started = started
                if job.time_limit is not None:  # counted from the child's start, not from now
                    job.deadline = now + job.time_limit - max(0.0, wall - started)
                self._by_pid[pid] = seq
            if len(chunk) < chunk_size:
                return count

    def _audit(self) -> None:
        """After a death: did the dead child take a job without reporting it?"""
        # The one lock order: self._lock, then ProcessPool's _direct_lock (submissions only),
        # then the task queue's put lock, then its read lock.
        with self._lock, self._pool._inqueue.frozen(timeout=0.05) as frozen:
            if not frozen:
                return  # try again on the next round
            self._read_reports()
            self._unreported.extend(self._pool._inqueue.unreported_takes())
        self._audit_due = False

    def _before_new_child(self) -> None:
        """Runs in Pool's worker-handler thread before each new child (see RESPAWN_FIRST);
        terminate() cuts the wait short."""
        if self._respawn_wait:
            logger.warning("children die before taking a job: starting the next in %.2fs",
                           self._respawn_wait)
            self._stop.wait(self._respawn_wait)

    def _fail_unreported(self) -> None:
        with self._lock:
            lost, self._unreported = self._unreported, []
        for seq in lost:
            self._fail_later(seq, None, UNREPORTED)

    def _settle_deaths(self, now: float) -> None:
        waiting = []
        for proc, seq, noticed in self._deaths:
            # Let Pool's worker handler reap the child first: two threads reading a forkserver
            # sentinel race for the exit status.
            if proc in self._pool._pool and now - noticed < REAP_WAIT:
                waiting.append((proc, seq, noticed))
                continue
            how = f"pid {proc.pid} {describe_exit(proc.exitcode)}"
            if seq is not None:
                self._fail_later(seq, proc.pid, how)
            elif proc.exitcode:
                logger.warning("idle worker %s", how)
                # An exit code (not a signal: an OOM kill, an operator) before any job: its
                # initializer failed. Slow the next one down.
                if proc.exitcode > 0 and proc.pid not in self._took_jobs:
                    with self._lock:  # _read_reports resets it under the lock
                        self._respawn_wait = min(max(2 * self._respawn_wait, RESPAWN_FIRST),
                                                 RESPAWN_MAX)
            self._took_jobs.discard(proc.pid)
        self._deaths = waiting

    def _enforce_time_limits(self, now: float) -> float:
        """SIGTERM, then SIGKILL, children whose job is over its limit; returns the seconds
        until the next limit event (at most watch_interval)."""
        next_event = self._watch_interval
        with self._lock:  # held while signalling: the pid cannot move on to another job meanwhile
            for pid, seq in self._by_pid.items():
                job = self._jobs[seq]
                if job.deadline is None or job.kill_sent:
                    continue
                if job.term_sent is None and now >= job.deadline:
                    logger.warning("job %r ran past its time limit of %g s: SIGTERM to pid %d",
                                   job.key, job.time_limit, pid)
                    job.term_sent = now
                    send_signal(pid, signal.SIGTERM)
                elif job.term_sent is not None and now >= job.term_sent + self._kill_grace:
                    logger.warning("job %r: pid %d still running %g s after SIGTERM: SIGKILL",
                                   job.key, pid, self._kill_grace)
                    job.kill_sent = True
                    send_signal(pid, signal.SIGKILL)
                    continue
                due = job.deadline if job.term_sent is None else job.term_sent + self._kill_grace
                next_event = min(next_event, due - now)
        return next_event

    def _live(self) -> list[BaseProcess]:
        procs = {}
        for proc in list(self._pool._pool):
            # Never proc.exitcode here: it may read a forkserver sentinel, racing Pool's reaper.
            if getattr(proc._popen, "returncode", None) is None:  # type: ignore[attr-defined]
                try:
                    procs[proc.sentinel] = proc
                except ValueError:  # not started yet
                    continue
        exited = set(wait(list(procs), timeout=0))
        return [proc for sentinel, proc in procs.items() if sentinel not in exited]

