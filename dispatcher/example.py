"""Example tasks, served when the dispatcher is started without --tasks.

They make the README's first screen work on a fresh machine and give the tests real work.
"""
from __future__ import annotations

import os
import time

from dispatcher.registry import task


@task(name="example.square")
def square(x: float) -> float:
    return x * x


@task(name="example.add")
def add(a: float, b: float) -> float:
    return a + b


@task(name="example.sleep")
def sleep(seconds: float) -> float:
    """Stands in for slow work (media, inference)."""
    time.sleep(seconds)
    return seconds


@task(name="example.burn")
def burn(seconds: float) -> int:
    """Pure-Python CPU work for about `seconds`; returns how many loops it did."""
    end = time.perf_counter() + seconds
    loops = 0
    while time.perf_counter() < end:
        loops += 1
    return loops


@task(name="example.fail", max_retries=0)
def fail(message: str = "failed on purpose") -> None:
    raise RuntimeError(message)


@task(name="example.pid")
def pid() -> int:
    return os.getpid()


@task(name="example.noop")
def noop() -> None:
    return None
