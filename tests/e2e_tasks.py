"""Tasks used by the end-to-end tests; the dispatcher under test imports them with --tasks."""
from __future__ import annotations

import os
import time

import redis

from dispatcher import task


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


@task(name="t.pid")
def pid():
    return os.getpid()
