"""``WorkerPool``: ``multiprocessing.Pool.apply_async`` with a guaranteed end for every job.

Facts about ``multiprocessing.Pool`` (CPython 3.10-3.13) that shape this module:

* a child that dies (SIGKILL, segfault, ``os._exit``, OOM) is replaced, but its job never
  completes: neither callback fires (gh-66587);
* a callback that raises kills the result-handler thread and hangs the pool (gh-83371);
* an idle child killed while blocked in ``SimpleQueue.get`` keeps the queue lock (cpython#96062);
* there is no way to kill the child that runs a given job (hard time limits).

How each is handled:

* Every child reports "job J taken by pid P" before it runs J (``queues.TaskQueue``); a watchdog
  thread reads these reports and waits on every child's sentinel. When a child dies, the job it
  had taken is failed with ``WorkerLost`` -- but only after a *barrier* message, sent by the
  watchdog through the result pipe, has reached the result handler: a child that sent its result
  and then died (e.g. on Pool's stop sentinel) has its real result delivered first.
* ``on_end`` is wrapped; whatever it raises is logged and swallowed. A lock and a dict pop make a
  second end of the same job impossible.
* The queues are replaced by lock-safe ones (``queues``), and ``Pool.terminate`` kills children
  with SIGKILL (children ignore SIGTERM between jobs, see ``child``).
* Hard time limits: SIGTERM to the job's child, SIGKILL ``kill_grace`` seconds later if it is
  still running that job; the job ends with ``TimeLimitExceeded`` once the child is gone.

Known windows, precisely:

* A child killed *from outside* (SIGKILL, OOM killer) while it holds the task queue's read lock
  -- from taking the lock, through reading one already-written task message and writing its
  20-byte start report, to releasing the lock: microseconds per job. The lock then stays held (no
  child can take another job) and the job being read is never reported, so it never ends. This
  is the residue of cpython#96062 that a pipe shared by several readers cannot avoid.
* A child killed (SIGKILL after the grace, or from outside) while sending a result bigger than
  PIPE_BUF: the partial message is dropped and the job ends with ``WorkerLost`` /
  ``TimeLimitExceeded``; the pipe stays usable.
* A hard time limit firing at the very moment the job finishes: the job ends either with its
  result or with ``TimeLimitExceeded``, whichever the pool sees first; exactly once either way.
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
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from multiprocessing import context as mp_context
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

from worker_pool import child
from worker_pool.queues import NO_JOB, REPORT, ResultQueue, TaskQueue

logger = logging.getLogger(__name__)

REAP_WAIT = 0.5  # seconds a death waits for Pool's worker handler to reap the child (exit status)
# After reading start reports the watchdog pauses this long, so that under load it wakes a few
# hundred times a second rather than once per job (a wake-up per job costs the parent ~20% of
# its throughput). Deaths and limits are then noticed at most this much later.
REPORT_BATCH = 0.005


@dataclass(frozen=True)
class JobEnd:
    """How one submitted job ended; handed to its ``on_end`` exactly once."""
    key: Hashable          # the caller's key for the job, as given to submit()
    ok: bool
    value: Any             # fn's return value when ok, else None
    error_type: str        # "" when ok; remote exception class name, "WorkerLost", "TimeLimitExceeded"
    error_message: str
    traceback: str         # remote traceback text ("" when ok or when there is none)
    started: float | None  # time.time() when the child took the job; None if it never did
    ended: float           # time.time() when the end was noticed


class WorkerLost(Exception):
    """The child running the job died before sending a result."""


class TimeLimitExceeded(Exception):
    """The job ran past its hard time limit and its child was killed."""


@dataclass(eq=False)
class _Job:
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


class _KillOnTerminate:
    """Children ignore SIGTERM between jobs, so Pool's own terminate path must use SIGKILL."""

    def terminate(self) -> None:
        self.kill()  # type: ignore[attr-defined]


class _ForkServerWorker(_KillOnTerminate, mp_context.ForkServerProcess):
    pass


class _SpawnWorker(_KillOnTerminate, mp_context.SpawnProcess):
    pass


class _ForkWorker(_KillOnTerminate, mp_context.ForkProcess):
    pass


_WORKERS = {"forkserver": _ForkServerWorker, "spawn": _SpawnWorker, "fork": _ForkWorker}


class _Pool(multiprocessing.pool.Pool):
    """Pool with lock-safe queues, SIGKILL on terminate, and a hook called for every new child."""

    def __init__(self, procs: int, initializer: Callable, initargs: tuple,
                 ctx: mp_context.BaseContext, report: Connection,
                 on_new_child: Callable[[multiprocessing.process.BaseProcess], None]) -> None:
        self._report = report
        self._on_new_child = on_new_child
        super().__init__(procs, initializer, initargs, context=ctx)

    def Process(self, ctx: mp_context.BaseContext, *args: Any, **kwds: Any) -> Any:  # noqa: N802
        # Shadows Pool.Process (a staticmethod): Pool calls self.Process for every child it
        # starts, so the watchdog learns of each child before it can run anything.
        proc = _WORKERS[ctx.get_start_method()](*args, **kwds)
        self._on_new_child(proc)
        return proc

    def _setup_queues(self) -> None:
        self._inqueue = TaskQueue(ctx=self._ctx, report=self._report)
        self._outqueue = ResultQueue(ctx=self._ctx)
        self._quick_put = self._inqueue.put
        self._quick_get = self._outqueue.get

    @staticmethod
    def _help_stuff_finish(inqueue: TaskQueue, task_handler: threading.Thread, size: int) -> None:
        # terminate(): drain queued tasks so the task handler can exit, like the stock method,
        # but never wait forever for a lock that a dead child may hold.
        if not inqueue._rlock.acquire(timeout=1.0):
            logger.warning("task queue lock still held after 1 s; not draining it")
            return
        while task_handler.is_alive() and inqueue._reader.poll():
            inqueue._reader.recv_bytes()
            time.sleep(0)


class _Barrier:
    """A fake Pool cache entry. The result handler reaches it only after every result that was
    in the result pipe when the barrier was sent, so ``action`` sees those results delivered."""

    def __init__(self, cache: dict, key: Hashable, action: Callable[[], None]) -> None:
        self._cache, self._key, self._action = cache, key, action

    def _set(self, i: int, obj: Any) -> None:
        try:
            self._action()
        except Exception:  # noqa: BLE001 -- must not kill Pool's result handler
            logger.exception("worker pool: failing a lost job raised")
        finally:
            del self._cache[self._key]


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
        self._jobs: dict[int, _Job] = {}       # Pool job id -> job, until it ends
        self._keys: set[Hashable] = set()
        self._by_pid: dict[int, int] = {}      # pid -> id of the job it took last
        self._closed = self._terminated = False
        self._abandoned = 0
        self._new_children: collections.deque = collections.deque()
        self._deaths: list[tuple[Any, int | None, float]] = []  # (process, job id, noticed)
        self._next_limit = watch_interval
        self._barrier_ids = itertools.count()
        self._report_in, self._report_out = Pipe(duplex=False)
        self._report_buf = b""
        os.set_blocking(self._report_in.fileno(), False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._report_in, selectors.EVENT_READ, None)
        self._pool = _Pool(procs, child.init_child, (initializer, initargs),
                           multiprocessing.get_context(start_method), self._report_out,
                           self._new_children.append)
        self._stop = threading.Event()
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
        for limit in (time_limit, soft_time_limit):
            if limit is not None and not limit > 0:
                raise ValueError(f"time limits must be positive, got {limit!r}")
        job = _Job(key, on_end, time_limit)
        with self._lock:
            if self._closed:
                raise ValueError("pool is closed")
            if key in self._keys:
                raise ValueError(f"a job with key {key!r} has not ended yet")
            job.result = self._pool.apply_async(
                child.run_job, (fn, args, kwargs or {}, soft_time_limit),
                callback=functools.partial(self._on_outcome, job),
                error_callback=functools.partial(self._on_error, job))
            job.seq = job.result._job  # type: ignore[attr-defined]
            self._jobs[job.seq] = job
            self._keys.add(key)

    def running(self) -> dict[Hashable, tuple[int, float]]:
        """key -> (pid, started) for the jobs a child has taken and that have not ended."""
        with self._lock:
            jobs = [(pid, self._jobs[seq]) for pid, seq in self._by_pid.items()]
        return {job.key: (pid, job.started) for pid, job in jobs if job.started is not None}

    def pending(self) -> int:
        """Submitted jobs that have not ended yet (queued or running)."""
        with self._lock:
            return len(self._jobs)

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
        """Wait until every submitted job has ended; True if they all did (not by terminate)."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._jobs, timeout) and not self._abandoned

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
        self._selector.close()
        self._report_in.close()
        self._report_out.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.terminate()

    # -- ends -------------------------------------------------------------------------------

    def _on_outcome(self, job: _Job, outcome: child.Outcome) -> None:
        ok, payload, started = outcome
        if ok:
            self._finish(job, True, payload, "", "", "", started)
        else:
            self._finish(job, False, None, *payload, started)

    def _on_error(self, job: _Job, exc: BaseException) -> None:
        message = str(exc)
        if isinstance(exc, multiprocessing.pool.MaybeEncodingError):
            message = f"the job's result could not be sent to the parent: {exc.exc}"
        tb = getattr(exc.__cause__, "tb", "")  # a RemoteTraceback, if Pool wrapped one
        if not tb and exc.__traceback__ is not None:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self._finish(job, False, None, type(exc).__name__, message, tb, None)

    def _finish(self, job: _Job, ok: bool, value: Any, error_type: str, message: str, tb: str,
                started: float | None) -> None:
        with self._lock:
            if job.seq not in self._jobs:
                return  # already ended (or abandoned by terminate)
            if started is None and job.started is None and not ok:
                self._read_reports()  # a failed job's start report may still be unread
            del self._jobs[job.seq]
            self._keys.discard(job.key)
            if job.pid is not None and self._by_pid.get(job.pid) == job.seq:
                del self._by_pid[job.pid]
            if not self._jobs:
                self._idle.notify_all()
        end = JobEnd(job.key, ok, value, error_type, message, tb,
                     started if started is not None else job.started, time.time())
        try:
            job.on_end(end)
        except BaseException:  # noqa: BLE001 -- gh-83371: a raising callback hangs the pool
            logger.exception("on_end for job %r raised; ignored", job.key)

    def _end_lost(self, seq: int, pid: int, how: str) -> None:
        """Runs in the result handler, behind a barrier: the dead child's results are in."""
        self._pool._outqueue.discard_partial(pid)
        with self._lock:
            job = self._jobs.get(seq)
        if job is None or job.result is None:
            return  # its result arrived before the child died
        if job.term_sent is not None:
            error: Exception = TimeLimitExceeded(
                f"time limit of {job.time_limit:g} s exceeded: pid {pid} {how}")
        else:
            error = WorkerLost(f"worker lost: pid {pid} {how}")
        logger.warning("job %r: %s", job.key, error)
        job.result._set(0, (False, error))  # type: ignore[attr-defined]

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
        timeout = min(self._next_limit, 0.01 if self._deaths else self._watch_interval)
        events = self._selector.select(max(timeout, 0.0))
        dead = [key.data for key, _ in events if key.data is not None]
        if len(dead) < len(events):
            self._stop.wait(REPORT_BATCH)  # let start reports pile up; see REPORT_BATCH
        for proc in dead:
            self._selector.unregister(proc.sentinel)
        with self._lock:
            self._read_reports()  # first: a dead child's last report is already in the pipe
            now = time.monotonic()
            self._deaths.extend((proc, self._by_pid.pop(proc.pid, None), now) for proc in dead)
        self._settle_deaths(now)
        self._next_limit = self._enforce_time_limits(time.monotonic())

    def _track_new_children(self) -> None:
        for _ in range(len(self._new_children)):
            proc = self._new_children.popleft()
            try:
                sentinel = proc.sentinel
            except ValueError:  # not started yet
                self._new_children.append(proc)
                continue
            self._selector.register(sentinel, selectors.EVENT_READ, proc)

    def _read_reports(self) -> None:
        """Apply every start report in the pipe. Caller holds ``self._lock``."""
        chunk_size = REPORT.size * 512
        while True:
            try:
                chunk = os.read(self._report_in.fileno(), chunk_size)
            except BlockingIOError:
                return
            data = self._report_buf + chunk
            usable = len(data) - len(data) % REPORT.size
            self._report_buf = data[usable:]
            now = time.monotonic()
            for seq, pid, started in REPORT.iter_unpack(data[:usable]):
                job = self._jobs.get(seq)
                if job is None:
                    continue  # already ended, or a wake-up record
                job.pid, job.started = pid, started
                if job.time_limit is not None:
                    job.deadline = now + job.time_limit
                self._by_pid[pid] = seq
            if len(chunk) < chunk_size:
                return

    def _settle_deaths(self, now: float) -> None:
        waiting = []
        for proc, seq, noticed in self._deaths:
            # Let Pool's worker handler reap the child first: two threads reading a forkserver
            # sentinel race for the exit status.
            if proc in self._pool._pool and now - noticed < REAP_WAIT:
                waiting.append((proc, seq, noticed))
                continue
            how = _exit_text(proc.exitcode)
            if seq is not None:
                self._post_barrier(functools.partial(self._end_lost, seq, proc.pid, how))
            elif proc.exitcode:
                logger.warning("idle worker pid %d %s", proc.pid, how)
        self._deaths = waiting

    def _post_barrier(self, action: Callable[[], None]) -> None:
        key = ("worker_pool.barrier", next(self._barrier_ids))
        cache = self._pool._cache
        cache[key] = _Barrier(cache, key, action)
        self._pool._outqueue.put((key, 0, None))

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
                    _kill(pid, signal.SIGTERM)
                elif job.term_sent is not None and now >= job.term_sent + self._kill_grace:
                    logger.warning("job %r: pid %d still running %g s after SIGTERM: SIGKILL",
                                   job.key, pid, self._kill_grace)
                    job.kill_sent = True
                    _kill(pid, signal.SIGKILL)
                    continue
                due = job.deadline if job.term_sent is None else job.term_sent + self._kill_grace
                next_event = min(next_event, due - now)
        return next_event

    def _live(self) -> list[Any]:
        procs = {}
        for proc in list(self._pool._pool):
            try:
                procs[proc.sentinel] = proc
            except ValueError:  # not started yet
                continue
        exited = set(wait(list(procs), timeout=0))  # readiness only: never reads the status
        return [proc for sentinel, proc in procs.items() if sentinel not in exited]


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _exit_text(exitcode: int | None) -> str:
    if exitcode is None:
        return "exited (status unknown)"
    if exitcode < 0:
        try:
            return f"exited with signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"exited with signal {-exitcode}"
    return f"exited with exit code {exitcode}"
