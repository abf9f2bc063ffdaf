"""Job functions for tests/test_worker_pool.py.

They live in a module of their own because pool children import them by name: a function
defined in a test module would drag the test module (and pytest) into every child.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

from worker_pool import Declined, SoftTimeLimitExceeded


def noop() -> None:
    return None


def double(x: int) -> int:
    return 2 * x


def fail(message: str) -> None:
    raise ValueError(message)


class Busy(Declined):
    pass


def decline(message: str) -> None:
    raise Busy(message)


def sys_exit(code: int) -> None:
    sys.exit(code)


def unpicklable_result() -> threading.Lock:
    return threading.Lock()


def os_exit(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def sleep_ignoring_sigterm(seconds: float) -> float:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return seconds


def sleep_and_clean_up(seconds: float) -> str:
    """Proves the soft limit raises *inside* the function: it gets to handle it."""
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "not interrupted"


def pattern(seed: int, size: int) -> bytes:
    """A payload whose every byte depends on the seed, so mixed-up frames would show."""
    block = bytes((seed + i) % 251 for i in range(251))
    return (block * (size // 251 + 1))[:size]


def checksum(data: bytes) -> int:
    return sum(data[::97]) + len(data)


def open_file_ids() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file descriptor open in this process (Linux)."""
    ids = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def broken_initializer() -> None:
    """A pool initializer that fails, as a task module that does not import in a child would."""
    raise ImportError("this child cannot start")


def exit_later(code: int, delay: float) -> None:
    """Return at once; the child exits with ``code`` ``delay`` seconds later, while idle."""
    threading.Timer(delay, os._exit, (code,)).start()
