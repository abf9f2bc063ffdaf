"""Retry, dead-letter and reply policy, without Redis or processes."""
from __future__ import annotations

import random

import msgpack

from dispatcher import outcomes
from dispatcher.codec import Task, decode
from dispatcher.keys import Keys

KEYS = Keys("p")
POLICY = outcomes.Policy(max_retries=3, backoff=1.0, backoff_max=30.0, result_ttl=60)
ERROR = ("ValueError", "bad", "Traceback ...")


def test_backoff_grows_with_jitter_and_is_capped():
    rng = random.Random(1)
    delays = [outcomes.backoff_delay(a, 1.0, 30.0, rng) for a in range(10)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 4.0 <= delays[3] <= 8.0
    assert all(15.0 <= d <= 30.0 for d in delays[5:])


def test_failure_with_retries_left_is_scheduled_on_its_priority():
    task = Task(name="a", id="i", attempt=1)
    item = outcomes.failure_item(3, task, "p:high", ERROR, 3, KEYS, POLICY, now=1000.0)
    assert item["action"] == "retry" and item["schedule_key"] == "p:schedule:high"
    assert 1001_000 <= item["due"] <= 1002_000
    assert decode(item["payload"], max_size=10**6).attempt == 2


def test_failure_without_retries_left_is_dead_with_error_reply():
    task = Task(name="a", id="i", attempt=3, want_result=True)
    item = outcomes.failure_item(0, task, "p:normal", ERROR, 3, KEYS, POLICY, now=0.0)
    assert item["action"] == "dead" and item["dead_list"] == "p:dead"
    assert item["fields"]["attempts"] == 4 and item["fields"]["error"] == "ValueError"
    assert item["result_key"] == "p:result:i"
    reply = msgpack.unpackb(item["reply"])
    assert reply["status"] == "error" and reply["traceback"] == "Traceback ..."
    assert decode(item["payload"], max_size=10**6).attempt == 0  # requeue starts afresh


def test_ack_writes_only_what_was_asked():
    quiet = outcomes.ack_item(1, Task(name="a", id="i"), None, KEYS, POLICY)
    assert quiet == {"slot": 1}                                  # a plain ack: finish.lua's short form
    asked = outcomes.ack_item(1, Task(name="a", id="i", want_result=True, reply_to="r"), b"x", KEYS, POLICY)
    assert (asked["result_key"], asked["reply_to"], asked["ttl"]) == ("p:result:i", "r", 60)
