"""Tasks scripts/bench.py runs."""
from __future__ import annotations

import time

from dispatcher import task


@task(name="bench.noop")
def noop() -> None:
    return None


@task(name="bench.stamp")
def stamp() -> float:
    """When the task started, by the wall clock (the bench runs on one machine)."""
    return time.time()


@task(name="bench.burn")
def burn(loops: int) -> float:
    """A fixed amount of pure-Python work (the bench calibrates loops to about 20 ms); returns
    the CPU seconds it took, so the bench knows the work done even if the machine's speed drifts."""
    started = time.process_time()
    total = 0
    for i in range(loops):
        total += i * i % 7
    return time.process_time() - started
