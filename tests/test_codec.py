"""The wire format: what decodes, what is refused, and that refusing never raises anything else."""
from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from dispatcher.codec import JSON, MSGPACK, Task, decode, decode_value
from dispatcher.errors import InvalidTask

LIMIT = 1024 * 1024


def test_json_task_from_redis_cli():
    task = decode(b'{"task": "example.square", "args": [9], "result": true}', max_size=LIMIT)
    assert (task.name, task.args, task.codec, task.want_result) == ("example.square", (9,), JSON, True)
    assert len(task.id) == 32  # assigned


def test_msgpack_round_trip_keeps_unknown_fields():
    task = Task(name="x.y", args=(1, "a"), kwargs={"k": [1]}, id="abc", extra={"trace": "t-1"})
    again = decode(task.encode(), max_size=LIMIT)
    assert again == task
    assert again.codec == MSGPACK


def test_retry_encoding_stays_in_the_codec_it_came_in():
    task = decode(b'{"task":"a","id":"i","custom":1}', max_size=LIMIT)
    retried = decode(task.next_attempt().encode(), max_size=LIMIT)
    assert retried.codec == JSON and retried.attempt == 1 and retried.extra == {"custom": 1}
    assert json.loads(task.next_attempt().encode())["custom"] == 1


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not valid"),
    (b'{"task": "a",', "not valid JSON"),
    (b"[1, 2]", "not valid"),                         # starts with '[': msgpack fixarray? no: invalid
    (msgpack.packb([1, 2]), "not a map"),
    (b'{"args": []}', "names no task"),
    (b'{"task": ""}', "names no task"),
    (b'{"task": 5}', "names no task"),
    (b'{"task": "a", "args": {"x": 1}}', "'args' must be a list"),
    (b'{"task": "a", "kwargs": [1]}', "'kwargs' must be a map"),
    (b'{"task": "a", "id": 7}', "'id' must be a string"),
    (b'{"task": "a", "max_retries": -1}', "'max_retries'"),
    (b'{"task": "a", "time_limit": 0}', "'time_limit'"),
    (b'{"task": "a", "result": "yes"}', "'result'"),
    (b'{"task": "a", "reply_to": ""}', "'reply_to'"),
    (b'{"task": "a", "reply_to": 3}', "'reply_to'"),
    (b'{"task": "a", "attempt": true}', "'attempt'"),
    (b'{"task": "a", "soft_time_limit": -1}', "'soft_time_limit'"),
    (b'{"task": "a", "enqueued_at": "now"}', "'enqueued_at'"),
    (b'\xff\xfe{"task": "a"}', "not valid"),
    (b'{"task": "a", "args": [1e999]}', "out of range"),
    (b'{"task": "a", "args": [NaN]}', "not JSON"),
    (b'{"task": "a", "time_limit": 1' + b"0" * 400 + b'}', "'time_limit' must be a finite number"),
    # Past what an outcome, a timer or a date can hold: each failed later, and the first wedged the loop
    (b'{"task": "a", "attempt": 18446744073709551615}', "'attempt' must be a whole number from 0"),
    (msgpack.packb({"task": "a", "max_retries": 2**64 - 1}), "'max_retries' must be a whole number from 0"),
    (b'{"task": "a", "soft_time_limit": 1e10}', "'soft_time_limit' must be a number of seconds > 0 and at most"),
    (b'{"task": "a", "enqueued_at": 1e300}', "'enqueued_at' must be a Unix time"),
    (b'{"task": "a", "enqueued_at": -1e18}', "'enqueued_at' must be a Unix time"),
    # Lone surrogates: no key, reply or dead letter can hold them
    (b'{"task": "a", "id": "x\\ud800"}', "'id' is not valid Unicode"),
    (b'{"task": "a\\udcff"}', "'task' is not valid Unicode"),
    (b'{"task": "a", "reply_to": "r\\ud800"}', "'reply_to' is not valid Unicode"),
])
def test_bad_elements_are_refused_with_a_reason(raw, reason):
    with pytest.raises(InvalidTask, match=reason):
        decode(raw, max_size=LIMIT)


def test_size_limit():
    with pytest.raises(InvalidTask, match="over the 100-byte limit"):
        decode(b'{"task": "a", "args": ["' + b"x" * 200 + b'"]}', max_size=100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_are_refused(raw):
    try:
        task = decode(raw, max_size=LIMIT)
    except InvalidTask:
        return
    assert isinstance(task, Task) and task.name


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["task", "args", "kwargs", "id", "result", "reply_to", "attempt",
                                        "max_retries", "time_limit", "other"]), json_values, max_size=6))
def test_arbitrary_json_maps_decode_or_are_refused(fields):
    raws = [json.dumps(fields).encode()]
    try:
        raws.append(msgpack.packb(fields))
    except OverflowError:
        pass  # msgpack has no integers beyond 64 bits; JSON does
    for raw in raws:
        try:
            task = decode(raw, max_size=LIMIT)
        except InvalidTask:
            continue
        assert decode_value(task.encode())["task"] == task.name


finite_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


options = st.fixed_dictionaries({}, optional={
    "result": st.booleans(), "attempt": st.integers(0, 9), "max_retries": st.integers(0, 9),
    "time_limit": st.floats(0.5, 9), "soft_time_limit": st.floats(0.5, 9),
    "enqueued_at": st.floats(0, 2e9), "reply_to": st.text(min_size=1, max_size=8), "other": finite_values,
})


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=8), st.lists(finite_values, max_size=3),
       st.dictionaries(st.text(max_size=8), finite_values, max_size=3), st.text(min_size=1, max_size=8),
       options, st.sampled_from([JSON, MSGPACK]))
def test_decode_gives_the_same_task_as_its_constructor(name, args, kwargs, task_id, opts, codec):
    """decode() fills a Task's __dict__ itself (_new_task); it must give an instance equal to what
    Task() gives, every field included, in order (a new field with a default factory shows here)."""
    fields = {"task": name, "args": args, "kwargs": kwargs, "id": task_id, **opts}
    raw = json.dumps(fields).encode() if codec == JSON else msgpack.packb(fields)
    got = decode(raw, max_size=LIMIT)
    sent = decode_value(raw)  # what the codec makes of the values (JSON has no tuples)
    want = Task(name=name, args=tuple(sent["args"]), kwargs=sent["kwargs"], id=task_id, codec=codec,
                reply_to=sent.get("reply_to"), want_result=sent.get("result", False),
                attempt=sent.get("attempt", 0), max_retries=sent.get("max_retries"),
                time_limit=sent.get("time_limit"), soft_time_limit=sent.get("soft_time_limit"),
                enqueued_at=sent.get("enqueued_at"), extra={"other": sent["other"]} if "other" in sent else {})
    assert got == want
    assert list(vars(got).items()) == list(vars(want).items())
    assert [type(v) for v in vars(got).values()] == [type(v) for v in vars(want).values()]
