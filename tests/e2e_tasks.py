"""Tasks used by the end-to-end tests; the dispatcher under test imports them with --tasks."""
from __future__ import annotations

import ctypes
import os
import time

import redis

from dispatcher import task
from worker_pool import SoftTimeLimitExceeded


@task(name="t.echo")
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@task(name="t.span")
def span(seconds: float, tag: str = ""):
    """Sleeps; returns when and where it ran, so tests can check concurrency."""
    start = time.time()
    time.sleep(seconds)
    return {"pid": os.getpid(), "start": start, "end": time.time(), "tag": tag}


@task(name="t.fail", max_retries=0)
def fail(message: str):
    raise ValueError(message)


@task(name="t.record")
def record(url: str, key: str, value: str, seconds: float = 0.0):
    """Appends value to a Redis list from the child, on the child's own connection."""
    if seconds:
        time.sleep(seconds)
    client = redis.Redis.from_url(url)
    try:
        client.rpush(key, value)
    finally:
        client.close()
    return value


@task(name="t.unserializable")
def unserializable():
    return object()


@task(name="t.quick", max_retries=0)
def quick(n: int, exit_code: int | None = None, seconds: float = 0.0) -> int:
    """Usually done in microseconds; may exit its child, or hang for a while, when asked."""
    if exit_code is not None:
        os._exit(exit_code)
    time.sleep(seconds)
    return n


@task(name="t.pid")
def pid():
    return os.getpid()


def _count(url: str, key: str) -> int:
    """How many times this call has started (attempts), counted in Redis from the child."""
    client = redis.Redis.from_url(url)
    try:
        client.rpush(key + ":pids", os.getpid())
        return client.incr(key)
    finally:
        client.close()


@task(name="t.hang_first")
def hang_first(url: str, key: str, seconds: float = 60.0):
    """The first attempt hangs (a test kills its child); later attempts return at once."""
    attempt = _count(url, key)
    if attempt == 1:
        time.sleep(seconds)
    return attempt


@task(name="t.crash_first")
def crash_first(url: str, key: str, how: str):
    """The first attempt kills its own child the way `how` says; later attempts succeed."""
    attempt = _count(url, key)
    if attempt == 1:
        if how == "exit":
            os._exit(3)
        elif how == "segfault":
            ctypes.string_at(0)
        else:
            os.kill(os.getpid(), 9)
    return attempt


@task(name="t.flaky")
def flaky(url: str, key: str, failures: int):
    attempt = _count(url, key)
    if attempt <= failures:
        raise ConnectionError(f"flaky failure {attempt}")
    return attempt


@task(name="t.counted_sleep")
def counted_sleep(url: str, key: str, seconds: float):
    attempt = _count(url, key)
    time.sleep(seconds)
    return attempt


@task(name="t.soft")
def soft(seconds: float):
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@task(name="t.limited", time_limit=0.5, max_retries=0)
def limited(seconds: float):
    time.sleep(seconds)
    return seconds
