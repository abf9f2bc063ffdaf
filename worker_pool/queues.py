"""The pool's two pipes, rebuilt so that a child killed at any moment can neither wedge them nor
make a job vanish.

``multiprocessing.queues.SimpleQueue`` (CPython 3.10-3.13) holds its read lock, a semaphore,
while it *blocks* in ``recv_bytes`` and its write lock while it writes: an idle child killed by
SIGKILL keeps the lock forever and the pool stops taking tasks (cpython#96062). Merely not
blocking while holding the semaphore is not enough: a child killed in the microseconds in which
it reads an available task still keeps it (measured: with only that change, the race test of
tests/test_worker_pool.py wedged in 2 runs of 10; with what follows, 0 of 20). So:

``TaskQueue`` (parent -> children; one writer at a time, the submitting thread or Pool's task
  handler thread, serialized by a lock; many readers)
  * The read lock is a ``RecordLock``: the kernel releases it when its holder dies.
  * A child waits for data without the lock and holds the lock only to read one message and
    write its start report ("job J taken by pid P at t", one ``os.write`` of 20 bytes), so start
    reports arrive in the order the tasks were taken, which is the order they were written.
  * Every message is one ``write(2)`` of at most PIPE_BUF bytes (bigger tasks are spilled to a
    file and the message names it). On Linux the pipe is in packet mode (``O_DIRECT``), so one
    ``read(2)`` takes exactly one whole message: a reader killed mid-read cannot leave half a
    message behind. (Elsewhere a reader reads a length, then the rest: a child killed between
    those two reads corrupts the pipe. That window is documented, not closed.)
  * The parent keeps a ledger of what it wrote. A reader killed after taking a message but
    before reporting it is found out either by the next report (takes happen in pipe order, so a
    report for a later job means the skipped ones were taken by a dead reader) or by an audit
    after a death: with writers and readers held off, the bytes left in the pipe tell exactly
    which messages are gone.

``ResultQueue`` (children -> parent; many writers; one reader, the parent's result-handler
  thread). Every message is cut into frames that each fit in one atomic pipe write, tagged with
  the writer's pid, and reassembled by the reader. There is no write lock for a dying writer to
  keep; a message cut short by its writer's death is dropped by the reader. (Skipping the write
  lock only for small messages would not do: a lock-free small write can land between the
  write(2) calls of a big message written under the lock.)

Both keep ``SimpleQueue``'s attributes (``_reader``, ``_writer``, ``_rlock``, ``_wlock``), which
``Pool`` uses, and its pickling: forkserver and spawn children receive the queues pickled, so
these classes must stay importable by module path.
"""
from __future__ import annotations

import collections
import contextlib
import copyreg
import fcntl
import io
import logging
import os
import pickle
import select
import shutil
import struct
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from multiprocessing import context
from multiprocessing.connection import Connection
from multiprocessing.queues import SimpleQueue
from multiprocessing.reduction import ForkingPickler
from typing import Any

logger = logging.getLogger(__name__)

# Start report written by a child when it takes a job: job id, pid, time.time().
REPORT = struct.Struct("!QId")
# TaskQueue message: length of the rest, Pool job id (NO_JOB for Pool's stop sentinel), flags.
TASK = struct.Struct("!IQB")
NO_JOB = 2**64 - 1
SPILLED = 1  # the body is the path of a file holding the pickled task
# ResultQueue frame header: writer pid, flags.
FRAME = struct.Struct("!IB")
FIRST, LAST = 1, 2
# A packet-mode task pipe is grown to this size: one page per queued message, so 256 messages.
PIPE_SIZE = 1 << 20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Connection.send_bytes adds a 4-byte length; one frame = one write(2) of at most PIPE_BUF bytes.
FRAME_BODY = select.PIPE_BUF - 4 - FRAME.size
LENGTH = struct.Struct("!i")  # Connection.send_bytes's length prefix
READ_AHEAD = 1 << 16


class _Pickler(pickle.Pickler):
    """``ForkingPickler`` minus its set-up per call, which copies copyreg's dispatch table: about
    as long as pickling a small task itself. A live view of the same two tables instead, so a
    reducer registered later (``copyreg.pickle``, ``ForkingPickler.register``) still counts.
    (Functions and builtin containers never consult it.)"""
    dispatch_table = collections.ChainMap(ForkingPickler._extra_reducers, copyreg.dispatch_table)


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf).dump(obj)
    return buf.getvalue()


class RecordLock:
    """An inter-process lock that the kernel releases when its holder dies.

    A POSIX record lock (``fcntl.lockf``) on an unlinked temporary file. It belongs to a
    process, not a thread: only children take it for reading tasks (from their one thread);
    the parent takes it only to audit the pipe or to drain it at terminate.
    """

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="worker_pool-lock-")
        os.unlink(path)
        self._file = Connection(fd)  # a Connection pickles by duplicating its descriptor

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool:
        fd = self._file.fileno()
        if block and timeout is None:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            return True
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:  # EAGAIN or EACCES: someone holds it
                if not block or time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)

    def release(self) -> None:
        fcntl.lockf(self._file.fileno(), fcntl.LOCK_UN)

    def __enter__(self) -> RecordLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def _task_pipe() -> tuple[int, int, bool]:
    """(read fd, write fd, packet mode). Packet mode: each read(2) returns one whole write(2)."""
    if sys.platform.startswith("linux") and hasattr(os, "O_DIRECT"):
        try:
            return (*os.pipe2(os.O_CLOEXEC | os.O_DIRECT), True)
        except OSError:  # kernels before 3.4
            pass
    return (*os.pipe(), False)


def _grow(fd: int) -> int:
    """Enlarge a packet-mode pipe as far as allowed; returns how many messages it holds."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(int(f.read()), PIPE_SIZE))
    except (OSError, ValueError):
        pass  # keep the default size
    try:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) // PAGE_SIZE
    except OSError:
        return 0


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("task pipe closed")
        data += chunk
    return data


class TaskQueue(SimpleQueue):
    """Parent -> children task pipe; see the module docstring."""

    def __init__(self, *, ctx: context.BaseContext, report: Connection) -> None:
        # SimpleQueue.__init__ is not called: this queue makes its own pipe and lock.
        read_fd, write_fd, self._packets = _task_pipe()
        self._reader = Connection(read_fd, writable=False)
        self._writer = Connection(write_fd, readable=False)
        self._rlock: RecordLock = RecordLock()
        self._wlock = None
        self._poll = self._reader.poll
        self._report = report
        self._poller: Any = None
        # Parent only (never pickled):
        self._put_lock = threading.Lock()
        self._ledger: collections.deque[tuple[int, int]] = collections.deque()  # (job, size)
        self._spill_dir: str | None = None
        self._spilled: set[int] = set()
        self._slots = _grow(write_fd) if self._packets else 0  # messages the pipe surely holds

    def __getstate__(self) -> tuple:
        context.assert_spawning(self)
        return (self._reader, self._writer, self._rlock, self._report, self._packets)

    def __setstate__(self, state: tuple) -> None:
        (self._reader, self._writer, self._rlock, self._report, self._packets) = state
        self._wlock = None
        self._poll = self._reader.poll
        self._poller = None

    # -- parent side ------------------------------------------------------------------------

    def put(self, obj: Any) -> None:
        """Send a task ``(job, i, func, args, kwds)`` or the stop sentinel ``None`` as one
        atomic write, and note it in the ledger. Blocks while the pipe is full."""
        self.send(*self.encode(obj))

    def encode(self, obj: Any) -> tuple[int, bytes]:
        """(job, message) for ``send``; raises what pickling raises."""
        job = NO_JOB if obj is None else obj[0]
        body, flags = dumps(obj), 0
        if TASK.size + len(body) > select.PIPE_BUF:
            body, flags = self._spill(job, body), SPILLED
        return job, TASK.pack(len(body) + TASK.size - 4, job, flags) + body

    def has_room(self) -> bool:
        """True if one more message surely fits in the pipe: ``send`` would not block.

        Only a packet-mode pipe can tell: there every message takes one of the pipe's page-sized
        slots, and the ledger (written, not yet reported taken) is never shorter than what the
        pipe holds. Holds until the next write; the caller keeps other writers out meanwhile.
        """
        return self._slots > len(self._ledger)

    def send(self, job: int, message: bytes) -> None:
        with self._put_lock:
            self._ledger.append((job, len(message)))
            try:
                os.write(self._writer.fileno(), message)  # <= PIPE_BUF: all or nothing
            except BaseException:
                self._ledger.pop()
                raise

    def _spill(self, job: int, body: bytes | memoryview) -> bytes:
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="worker_pool-tasks-")
        path = os.path.join(self._spill_dir, str(job))
        with open(path, "wb") as f:
            f.write(body)
        self._spilled.add(job)
        return path.encode()

    def forget(self, job: int) -> None:
        """The job ended: remove its spill file if a child did not get to it."""
        if job in self._spilled:
            self._spilled.discard(job)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(str(self._spill_dir), str(job)))

    def taken(self, job: int) -> list[int]:
        """A child reported taking ``job``; returns the jobs written before it that nobody
        reported: their reader died in between. One thread at a time (the caller's lock)."""
        ledger = self._ledger
        if ledger and ledger[0][0] == job:
            ledger.popleft()
            return []
        # list() copies in one step under the GIL; iterating the deque itself could see the
        # task handler append to it.
        if all(entry != job for entry, _ in list(ledger)):
            logger.error("start report for job %d, which is not in the task ledger", job)
            return []
        lost = []
        while (entry := ledger.popleft()[0]) != job:
            if entry != NO_JOB:
                lost.append(entry)
        return lost

    @contextlib.contextmanager
    def frozen(self, timeout: float) -> Iterator[bool]:
        """Hold off the writer and the readers, for ``unreported_takes``; yields False if that
        was not possible (try again later). The writer is not waited for: the task handler
        holds the put lock while it blocks on a full pipe, and the caller may hold the pool's
        lock meanwhile. Readers hold their lock briefly and are waited for up to ``timeout``."""
        if not self._put_lock.acquire(blocking=False):
            yield False
            return
        try:
            # With the writer held, every message is whole in the pipe, so a reader holds the
            # lock only briefly.
            if not self._rlock.acquire(timeout=timeout):
                yield False
                return
            try:
                yield True
            finally:
                self._rlock.release()
        finally:
            self._put_lock.release()

    def unreported_takes(self) -> list[int]:
        """Inside ``frozen()``, after every start report has been read through ``taken()``: the
        jobs that left the pipe without a report. The pipe holds a tail of the ledger; whatever
        precedes that tail was taken by a reader that died before reporting."""
        buf = fcntl.ioctl(self._reader.fileno(), termios.FIONREAD, b"\0\0\0\0")
        (in_pipe,) = struct.unpack("i", buf)
        tail, count = 0, 0
        for _, size in reversed(self._ledger):
            if tail >= in_pipe:
                break
            tail, count = tail + size, count + 1
        if tail != in_pipe:
            logger.error("task pipe holds %d bytes, which is not a whole number of the last "
                         "tasks written (%d bytes): a child died in the middle of a read",
                         in_pipe, tail)
            return []
        lost = []
        for _ in range(len(self._ledger) - count):
            job = self._ledger.popleft()[0]
            if job != NO_JOB:
                lost.append(job)
        return lost

    def discard_one(self) -> None:
        """Parent, at terminate, holding the read lock: drop one queued message."""
        self._read_message()

    def remove_spill_dir(self) -> None:
        """Parent, once no child runs any more."""
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    # -- child side -------------------------------------------------------------------------

    def get(self) -> Any:
        """Child only: take the next task, reporting its start before letting go of the lock."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._reader.fileno(), select.POLLIN)
        while True:
            self._poller.poll()  # an idle child blocks here, holding nothing
            with self._rlock:
                if not self._poller.poll(0):
                    continue  # another child took it
                message = self._read_message()
                _, job, flags = TASK.unpack_from(message)
                if job != NO_JOB:
                    os.write(self._report.fileno(), REPORT.pack(job, os.getpid(), time.time()))
            body = memoryview(message)[TASK.size:]
            if flags & SPILLED:
                path = bytes(body)
                with open(path, "rb") as f:
                    body = memoryview(f.read())
                os.unlink(path)
            return pickle.loads(body)

    def _read_message(self) -> bytes:
        fd = self._reader.fileno()
        if self._packets:
            message = os.read(fd, select.PIPE_BUF)
            if not message:
                raise EOFError("task pipe closed")
            return message
        head = _read_exactly(fd, 4)
        return head + _read_exactly(fd, struct.unpack("!I", head)[0])


class ResultQueue(SimpleQueue):
    """Children -> parent result pipe with no write lock: every write is one atomic frame."""

    def __init__(self, *, ctx: context.BaseContext) -> None:
        super().__init__(ctx=ctx)
        self._partial: dict[int, list[bytes]] = {}
        self._buf, self._pos = b"", 0  # bytes read ahead from the pipe, and where the next frame starts

    def __setstate__(self, state: tuple) -> None:
        super().__setstate__(state)
        self._partial = {}
        self._buf, self._pos = b"", 0

    def put(self, obj: Any) -> None:
        """Any process, any thread: send ``obj`` as frames of at most PIPE_BUF bytes each.

        Frames of one message may interleave with other writers' frames; the reader sorts them
        out by pid. (Two threads of one process must not send multi-frame messages at the same
        time; the parent only ever sends tiny messages, children send from one thread.)
        """
        data = memoryview(dumps(obj))
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
            frame = self._next_frame()
            pid, flags = FRAME.unpack_from(frame)
            body = frame[FRAME.size:]
            if flags == FIRST | LAST:
                return pickle.loads(body)
            if flags & FIRST:
                self._partial[pid] = []  # also drops what a dead writer with this pid left
            parts = self._partial.get(pid)
            if parts is None:
                continue  # the tail of a message whose head was dropped
            parts.append(body)
            if flags & LAST:
                return pickle.loads(b"".join(self._partial.pop(pid)))

    def _next_frame(self) -> bytes:
        """One frame as ``Connection.send_bytes`` wrote it (a 4-byte length, then the bytes).

        Reads whatever the pipe holds, up to READ_AHEAD bytes, in one ``read(2)``: under load
        that is many results per system call (and per release of the GIL), where
        ``Connection.recv_bytes`` makes two calls for each. Writes are atomic, so frames are
        never interleaved; a read may still end inside one, whose rest the next read brings.
        """
        while True:
            buf, pos = self._buf, self._pos
            if len(buf) - pos >= LENGTH.size:
                end = pos + LENGTH.size + LENGTH.unpack_from(buf, pos)[0]
                if end <= len(buf):
                    self._pos = end
                    return buf[pos + LENGTH.size:end]
            chunk = os.read(self._reader.fileno(), READ_AHEAD)  # blocks while the pipe is empty
            if not chunk:
                raise EOFError("result pipe closed")
            self._buf, self._pos = buf[pos:] + chunk, 0

    def discard_partial(self, pid: int) -> None:
        """Reader's thread only: forget a message ``pid`` died while sending."""
        self._partial.pop(pid, None)
