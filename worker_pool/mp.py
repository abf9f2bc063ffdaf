"""What ``worker_pool`` changes in ``multiprocessing.pool.Pool`` (CPython 3.10-3.13), in one place.

* ``_setup_queues``: the lock-safe queues of ``worker_pool.queues``.
* ``start_job`` instead of ``apply_async``: writes the task itself when the pipe has room,
  saving a wake-up of Pool's task handler thread per job (about 0.2 ms of latency for an idle
  pool); returns a ``JobResult``, an ``ApplyResult`` without the Event that only ``get()``
  needs, which takes several results per job (a batch's calls, see ``child.run_batch``).
* The initializer gets the result queue as its first argument, for ``child.run_batch``, and
  the owner's pid as its second (``child.init_child``: a child dies with its owner).
* ``Process``: Pool calls ``self.Process`` for every child it starts; the override first lets the
  owner pause (``before_new_child``: back-off after children that died at start), reports each
  new child to the watchdog before the child can run anything, and makes ``terminate()`` of a
  child mean SIGKILL (children ignore SIGTERM between jobs, see ``worker_pool.child``, so the
  stock SIGTERM in ``Pool.terminate`` would leave them running and its join hanging).
* ``_help_stuff_finish`` (terminate): never waits forever for the task queue's read lock.

``Barrier`` is a fake entry of ``Pool._cache``: the result handler meets it only after every
result that was in the result pipe when the barrier was sent.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing.pool
import os
import signal
import threading
import time
from collections.abc import Callable, Hashable
from multiprocessing import context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from worker_pool.queues import ResultQueue, TaskQueue

logger = logging.getLogger(__name__)


class _KillOnTerminate:
    def terminate(self) -> None:
        self.kill()  # type: ignore[attr-defined]


class _ForkServerWorker(_KillOnTerminate, context.ForkServerProcess):
    pass


class _SpawnWorker(_KillOnTerminate, context.SpawnProcess):
    pass


class _ForkWorker(_KillOnTerminate, context.ForkProcess):
    pass


_WORKERS = {"forkserver": _ForkServerWorker, "spawn": _SpawnWorker, "fork": _ForkWorker}


class ProcessPool(multiprocessing.pool.Pool):
    """``multiprocessing.pool.Pool`` with lock-safe queues and a hook on every new child."""

    _inqueue: TaskQueue
    _outqueue: ResultQueue

    def __init__(self, procs: int, initializer: Callable, initargs: tuple,
                 ctx: context.BaseContext, report: Connection,
                 on_new_child: Callable[[BaseProcess], None],
                 before_new_child: Callable[[], None]) -> None:
        self._report = report
        self._on_new_child = on_new_child
        self._before_new_child = before_new_child
        self._results = ResultQueue(ctx=ctx)
        super().__init__(procs, initializer, (self._results, os.getpid(), *initargs), context=ctx)
        self._cache.notifier = _NotifyOnceClosed(self, self._change_notifier)

    def Process(self, ctx: context.BaseContext, *args: Any, **kwds: Any) -> Any:  # noqa: N802
        # Shadows Pool.Process, a staticmethod, on purpose (see the module docstring).
        self._before_new_child()
        proc = _WORKERS[ctx.get_start_method()](*args, **kwds)
        self._on_new_child(proc)
        return proc

    def _get_sentinels(self) -> list[Any]:
        # Stock Pool also wakes its worker handler whenever the result pipe is readable, and
        # that wait stays ready until the result handler has read: a busy-poll of every child's
        # exit status on each result. Children's own sentinels (added by the handler) and the
        # change notifier are all it needs to replace a dead child and to notice close().
        return [self._change_notifier._reader]

    def start_job(self, func: Callable, args: tuple,
                  on_result: Callable[[int, bool, Any], None], *, last: int = 0,
                  pass_id: bool = False) -> JobResult:
        """Queue ``func(*args)`` (``func(job_id, *args)`` with ``pass_id``); ``on_result(i, ok,
        value)`` runs in the result handler for each of its results, ``i`` up to ``last``.

        Like stock ``apply_async``, minus a thread hop when it can: the task is written to the
        pipe from the caller's thread if the pipe surely has room for it. Otherwise (pipe full,
        a task that cannot be pickled) it goes through Pool's task handler thread as usual, and
        so do all later tasks until the handler has caught up, so tasks keep their order."""
        self._check_running()
        result = JobResult(self, on_result, last)
        task = (result._job, last, func, (result._job, *args) if pass_id else args, {})
        with self._direct_lock:
            if not self._handed_off and self._inqueue.has_room():
                try:
                    self._inqueue.send(*self._inqueue.encode(task))
                    return result
                except Exception:  # noqa: BLE001 -- the handler retries and reports it, as stock Pool does
                    pass
            self._handed_off += 1
        self._taskqueue.put(([task], None))
        return result

    def _put_from_handler(self, obj: Any) -> None:
        try:
            self._inqueue.put(obj)
        finally:
            if obj is not None:
                with self._direct_lock:
                    self._handed_off -= 1

    def _setup_queues(self) -> None:
        self._inqueue = TaskQueue(ctx=self._ctx, report=self._report)
        self._outqueue = self._results
        self._direct_lock = threading.Lock()
        self._handed_off = 0  # tasks given to the task handler thread and not yet written
        self._quick_put = self._put_from_handler
        self._quick_get = self._outqueue.get

    @staticmethod
    def _help_stuff_finish(inqueue: TaskQueue, task_handler: threading.Thread, size: int) -> None:
        # Like the stock method: drain queued tasks so that the task handler can exit.
        if not inqueue._rlock.acquire(timeout=1.0):
            logger.warning("task queue read lock still held after 1 s; not draining it")
            return
        while task_handler.is_alive() and inqueue._reader.poll():
            inqueue.discard_one()
            time.sleep(0)


class JobResult(multiprocessing.pool.ApplyResult):
    """What ``ProcessPool.start_job`` returns: an ``ApplyResult`` known only through its
    callback. Stock ``ApplyResult`` builds a ``threading.Event`` (a Condition and its locks)
    for every job, for ``get()`` and ``wait()``, which the worker pool never calls; that was a
    sixth of the parent's cost of submitting a no-op. It also takes results ``0..last`` (the
    Pool job's own result, sent by Pool's worker loop, is ``last``) and leaves Pool's cache
    after that one, or when ``drop()``ped."""

    def __init__(self, pool: multiprocessing.pool.Pool, on_result: Callable[[int, bool, Any], None],
                 last: int) -> None:
        self._pool = pool
        self._job = next(multiprocessing.pool.job_counter)  # type: ignore[attr-defined]
        self._cache = pool._cache  # type: ignore[attr-defined]
        self._on_result = on_result
        self._last = last
        self._cache[self._job] = self

    def ready(self) -> bool:
        return self._pool is None

    def wait(self, timeout: float | None = None) -> None:
        raise TypeError("a JobResult reports through its callback only")

    def _set(self, i: int, obj: tuple[bool, Any]) -> None:
        try:
            self._on_result(i, *obj)
        finally:
            if i >= self._last:
                self.drop()

    def drop(self) -> None:
        """Take no more results: the child that would send them is gone. Result handler only."""
        if self._job in self._cache:  # del, not pop: Pool's cache notifies on del when it empties
            del self._cache[self._job]
        self._pool = None


class _NotifyOnceClosed:
    """Pool's cache wakes the worker handler each time it empties, so that a closed pool can
    exit once its jobs are done. With one job per child the cache empties after nearly every
    job, and each wake-up polls every child's sentinel: about a sixth of the parent's CPU in a
    no-op drain. While the pool runs, those wake-ups have nothing to do."""

    def __init__(self, pool: multiprocessing.pool.Pool, notifier: Any) -> None:
        self._pool = pool
        self._notifier = notifier

    def put(self, obj: Any) -> None:
        if self._pool._state != multiprocessing.pool.RUN:  # type: ignore[attr-defined]
            self._notifier.put(obj)


class Barrier:
    """Runs ``action`` in the result handler once every result sent before it was handled."""

    def __init__(self, cache: dict, key: Hashable, action: Callable[[], None]) -> None:
        self._cache, self._key, self._action = cache, key, action

    def _set(self, i: int, obj: Any) -> None:  # what the result handler calls on a cache entry
        try:
            self._action()
        except Exception:  # noqa: BLE001 -- must not kill Pool's result handler (gh-83371)
            logger.exception("worker pool: a barrier action failed")
        finally:
            del self._cache[self._key]

    @staticmethod
    def send(pool: ProcessPool, key: Hashable, action: Callable[[], None]) -> None:
        pool._cache[key] = Barrier(pool._cache, key, action)
        pool._outqueue.put((key, 0, None))


def send_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def describe_exit(exitcode: int | None) -> str:
    """"exited with signal SIGKILL", "exited with exit code 3"."""
    if exitcode is None:
        return "exited (status unknown)"
    if exitcode < 0:
        try:
            return f"exited with signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"exited with signal {-exitcode}"
    return f"exited with exit code {exitcode}"
