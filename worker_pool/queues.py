"""The pool's two pipes, rebuilt so that a child killed at any moment cannot wedge them.

``multiprocessing.queues.SimpleQueue`` (CPython 3.10-3.13) holds its read lock while it *blocks*
in ``recv_bytes`` and its write lock while it writes: an idle child killed by SIGKILL keeps the
read lock forever and the whole pool stops taking tasks (cpython#96062); a child killed while
sending a result does the same to the write lock. These subclasses keep ``SimpleQueue``'s
attributes (``_reader``, ``_writer``, ``_rlock``, ``_wlock``), which ``Pool`` relies on, and its
pickling (forkserver and spawn children receive the queues pickled, so these classes must stay
importable by module path).

``TaskQueue`` (parent -> children; one writer, the parent's task-handler thread; many readers).
  A child waits for data *without* the lock, then holds the lock only to read a message that is
  already there. Each message carries the Pool job id in a fixed 8-byte header; the child writes
  its start report "job J taken by pid P at t" with one ``os.write`` of a 20-byte record (atomic:
  below PIPE_BUF) *before it releases the lock*. So a taken job is always reported, unless the
  child dies inside that locked section.

``ResultQueue`` (children -> parent; many writers; one reader, the parent's result-handler
  thread). Every message is cut into frames that each fit in one atomic pipe write, tagged with
  the writer's pid, and reassembled by the reader. No write lock exists, so there is nothing a
  dying writer could keep; a message cut short by its writer's death is dropped by the reader.
"""
from __future__ import annotations

import os
import select
import struct
import time
from multiprocessing import context
from multiprocessing.connection import Connection
from multiprocessing.queues import SimpleQueue
from multiprocessing.reduction import ForkingPickler
from typing import Any

# Start report written by a child when it takes a job: job id, pid, time.time().
REPORT = struct.Struct("!QId")
# TaskQueue message header: the Pool job id, or NO_JOB for Pool's "stop" sentinel (None).
TASK_HEADER = struct.Struct("!Q")
NO_JOB = 2**64 - 1
# ResultQueue frame header: writer pid, flags.
FRAME = struct.Struct("!IB")
FIRST, LAST = 1, 2
# Connection.send_bytes adds a 4-byte length; one frame = one write(2) of at most PIPE_BUF bytes.
FRAME_BODY = select.PIPE_BUF - 4 - FRAME.size


class _Readable:
    """Waits until a pipe has data, without taking any lock; one poll object per process."""

    def __init__(self, fd: int) -> None:
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)

    def __call__(self, timeout: float | None) -> bool:
        ms = None if timeout is None else int(timeout * 1000)
        return bool(self._poller.poll(ms))


class TaskQueue(SimpleQueue):
    """Parent -> children task pipe whose read lock is never held while waiting."""

    def __init__(self, *, ctx: context.BaseContext, report: Connection) -> None:
        super().__init__(ctx=ctx)
        self._report = report
        self._readable: _Readable | None = None

    def __getstate__(self) -> tuple:
        context.assert_spawning(self)
        return (self._reader, self._writer, self._rlock, self._wlock, self._report)

    def __setstate__(self, state: tuple) -> None:
        (self._reader, self._writer, self._rlock, self._wlock, self._report) = state
        self._poll = self._reader.poll
        self._readable = None

    def put(self, obj: Any) -> None:
        """Parent only (``Pool._quick_put``): frame a task or the stop sentinel.

        The task handler thread is the only writer, as with the stock ``_quick_put``, so no lock
        is needed; the task tuple is ``(job, i, func, args, kwds)``.
        """
        job = NO_JOB if obj is None else obj[0]
        self._writer.send_bytes(TASK_HEADER.pack(job) + ForkingPickler.dumps(obj))

    def get(self) -> Any:
        """Child only: take the next task, reporting its start before letting go of the lock."""
        if self._readable is None:
            self._readable = _Readable(self._reader.fileno())
        while True:
            self._readable(None)  # an idle child blocks here, holding nothing
            with self._rlock:
                if not self._readable(0):
                    continue  # another child took it
                data = self._reader.recv_bytes()
                (job,) = TASK_HEADER.unpack_from(data)
                if job != NO_JOB:
                    os.write(self._report.fileno(), REPORT.pack(job, os.getpid(), time.time()))
            return ForkingPickler.loads(memoryview(data)[TASK_HEADER.size:])


class ResultQueue(SimpleQueue):
    """Children -> parent result pipe with no write lock: every write is one atomic frame."""

    def __init__(self, *, ctx: context.BaseContext) -> None:
        super().__init__(ctx=ctx)
        self._partial: dict[int, list[bytes]] = {}

    def __setstate__(self, state: tuple) -> None:
        super().__setstate__(state)
        self._partial = {}

    def put(self, obj: Any) -> None:
        """Any process, any thread: send ``obj`` as frames of at most PIPE_BUF bytes each.

        Frames of one message may interleave with other writers' frames; the reader sorts them
        out by pid. (Two threads of one process must not send multi-frame messages at the same
        time; the parent only ever sends tiny messages, children send from one thread.)
        """
        data = memoryview(ForkingPickler.dumps(obj))
        pid = os.getpid()
        if len(data) <= FRAME_BODY:
            self._writer.send_bytes(FRAME.pack(pid, FIRST | LAST) + data)
            return
        for start in range(0, len(data), FRAME_BODY):
            flags = (FIRST if start == 0 else 0) | (LAST if start + FRAME_BODY >= len(data) else 0)
            self._writer.send_bytes(FRAME.pack(pid, flags) + data[start:start + FRAME_BODY])

    def get(self) -> Any:
        """Parent's result handler only (``Pool._quick_get``): the next whole message."""
        while True:
            frame = self._reader.recv_bytes()
            pid, flags = FRAME.unpack_from(frame)
            body = memoryview(frame)[FRAME.size:]
            if flags == FIRST | LAST:
                return ForkingPickler.loads(body)
            if flags & FIRST:
                self._partial[pid] = []  # also drops what a dead writer with this pid left
            parts = self._partial.get(pid)
            if parts is None:
                continue  # the tail of a message whose head was dropped
            parts.append(bytes(body))
            if flags & LAST:
                return ForkingPickler.loads(b"".join(self._partial.pop(pid)))

    def discard_partial(self, pid: int) -> None:
        """Reader's thread only: forget a message ``pid`` died while sending."""
        self._partial.pop(pid, None)
