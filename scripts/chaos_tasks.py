"""The task scripts/chaos.py runs: record that it ran, after a little random work."""
from __future__ import annotations

import os
import random
import time

import redis

from dispatcher import task

_clients: dict[int, redis.Redis] = {}


def _client(url: str) -> redis.Redis:
    """One connection per child process, made in the child (never one inherited from a parent)."""
    pid = os.getpid()
    if pid not in _clients:
        _clients[pid] = redis.Redis.from_url(url, socket_timeout=5)
    return _clients[pid]


@task(name="chaos.record", max_retries=1000)
def record(url: str, key: str, task_id: str, most_seconds: float) -> None:
    time.sleep(random.uniform(0, most_seconds))
    _client(url).rpush(key, task_id)
