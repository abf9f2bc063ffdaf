"""The wire format: a task is one list element, a JSON object or a msgpack map.

JSON is what a person types at redis-cli; msgpack is what the Python helper sends. They cannot be
confused: a JSON object starts with ``{`` (0x7b), which in msgpack is a positive fixint, never a
map. Replies go back in the codec the task came in, so a redis-cli user can read them. No pickle:
anyone who can write to Redis must not be able to run code in the workers.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import Any, Mapping

import msgpack

from dispatcher.errors import InvalidTask

JSON = "json"
MSGPACK = "msgpack"

# Wire field names; anything else in a payload is kept (``extra``) and ignored.
KNOWN_FIELDS = frozenset({
    "task", "args", "kwargs", "id", "reply_to", "result",
    "attempt", "max_retries", "time_limit", "soft_time_limit", "enqueued_at",
})


@dataclass(frozen=True)
class Task:
    """One decoded task element; ``encode()`` gives bytes in the codec it came in.

    decode() builds instances without __init__ (``_new_task``): a __post_init__ added here
    would not run for decoded tasks.
    """

    name: str
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""
    codec: str = MSGPACK
    reply_to: str | None = None
    want_result: bool = False
    attempt: int = 0
    max_retries: int | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    enqueued_at: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_fields(self) -> dict[str, Any]:
        """The wire map, leaving out fields at their defaults so elements stay small."""
        fields: dict[str, Any] = dict(self.extra)
        fields["task"] = self.name
        fields["id"] = self.id
        if self.args:
            fields["args"] = list(self.args)
        if self.kwargs:
            fields["kwargs"] = dict(self.kwargs)
        optional = {
            "reply_to": self.reply_to, "attempt": self.attempt or None,
            "max_retries": self.max_retries, "time_limit": self.time_limit,
            "soft_time_limit": self.soft_time_limit, "enqueued_at": self.enqueued_at,
        }
        fields.update((k, v) for k, v in optional.items() if v is not None)
        if self.want_result:
            fields["result"] = True
        return fields

    def encode(self) -> bytes:
        return encode(self.codec, self.to_fields())

    def next_attempt(self) -> "Task":
        return replace(self, attempt=self.attempt + 1)


# Elements with only these fields need no option checks (most elements from redis-cli).
_PLAIN_FIELDS = frozenset({"task", "args", "kwargs", "id"})
# Bounds on numbers a producer sends. Past them, an integer no longer fits the 64 bits of an
# outcome written to Redis, a time limit overflows the child's timer, and a time overflows
# the dead letter's date: each used to fail later, where it is harder to say why.
MAX_COUNT = 2**31 - 1        # attempt, max_retries
MAX_SECONDS = 1e8            # time limits: about three years
MAX_UNIX_TIME = 1e11         # enqueued_at: the year 5138
# Every field in order, at its default; _task_from_fields gives those without one (name) or
# with a default factory (kwargs, extra).
_TASK_DEFAULTS = {f.name: f.default for f in dataclass_fields(Task)}


# Task ids come from a generator of their own, seeded by the OS here and again in every forked
# child (a random.seed() elsewhere cannot make them repeat), not from os.urandom: a system call
# per task lets the pool's result thread take the GIL, and the dispatcher's loop waits for it.
# Ids must be unique, not secret: whoever can read them in Redis can read the tasks too.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_task_id() -> str:
    """128 random bits in hex, like uuid4().hex, at a fraction of the cost (once per task)."""
    return f"{_ids.getrandbits(128):032x}"


def encode(codec: str, value: Any) -> bytes:
    """Encode a value in one of the two wire codecs; TypeError/ValueError if it cannot be."""
    if codec == JSON:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return msgpack.packb(value, use_bin_type=True)


def sniff(raw: bytes) -> str:
    """Which codec an element is in; whitespace before a JSON object is forgiven."""
    return JSON if raw.lstrip()[:1] == b"{" else MSGPACK


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# JSON numbers must be finite, so whatever decodes can be encoded again (a retry re-encodes).
# One decoder for every element: json.loads with options builds a new one per call.
_JSON_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)


def decode_value(raw: bytes) -> Any:
    """Decode an element or a reply whatever codec it is in (for readers such as the CLI)."""
    return _decode_as(sniff(raw), raw)


def _decode_as(codec: str, raw: bytes) -> Any:
    if codec == MSGPACK:
        return msgpack.unpackb(raw, raw=False)
    # '{"' is how nearly every element starts, and only UTF-8 can start so (UTF-16 and UTF-32
    # put a zero byte next to the brace): skip the encoding detection.
    encoding = "utf-8" if raw[:2] == b'{"' else json.detect_encoding(raw)
    return _JSON_DECODER.decode(raw.decode(encoding, "surrogatepass"))


def decode(raw: bytes, *, max_size: int) -> Task:
    """Turn one list element into a Task, or raise InvalidTask with a reason a person can act on."""
    if len(raw) > max_size:
        raise InvalidTask(f"element is {len(raw)} bytes, over the {max_size}-byte limit")
    codec = sniff(raw)
    try:
        fields = _decode_as(codec, raw)
    except Exception as exc:  # any decoder failure is the producer's mistake, never ours
        kind = "JSON" if codec == JSON else "JSON or msgpack"
        raise InvalidTask(f"element is not valid {kind}: {type(exc).__name__}: {exc}"[:500]) from exc
    if not isinstance(fields, dict):
        raise InvalidTask(f"element is a {type(fields).__name__}, not a map with a 'task' field")
    return _task_from_fields(fields, codec)


def _task_from_fields(fields: dict, codec: str) -> Task:
    name = fields.get("task")
    if not isinstance(name, str) or not name:
        raise InvalidTask("element names no task: field 'task' must be a non-empty string")
    _text(name, "task")
    args = fields.get("args", [])
    kwargs = fields.get("kwargs", {})
    if args is None:
        args = []
    if kwargs is None:
        kwargs = {}
    if not isinstance(args, list):
        raise InvalidTask(f"field 'args' must be a list, not {type(args).__name__}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidTask("field 'kwargs' must be a map with string keys")
    task_id = fields.get("id")
    if task_id is None or task_id == "":
        task_id = new_task_id()
    elif not isinstance(task_id, str):
        raise InvalidTask(f"field 'id' must be a string, not {type(task_id).__name__}")
    else:
        _text(task_id, "id")
    values = {**_TASK_DEFAULTS, "name": name, "args": tuple(args), "kwargs": kwargs, "id": task_id,
              "codec": codec, "extra": {}}
    if not fields.keys() <= _PLAIN_FIELDS:
        values.update(_options(fields))
    return _new_task(values)


def _options(fields: dict) -> dict[str, Any]:
    reply_to = fields.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not reply_to):
        raise InvalidTask("field 'reply_to' must be a non-empty string (a list key)")
    if reply_to is not None:
        _text(reply_to, "reply_to")
    return {"reply_to": reply_to, "want_result": _flag(fields, "result"),
            "attempt": _count(fields, "attempt") or 0, "max_retries": _count(fields, "max_retries"),
            "time_limit": _seconds(fields, "time_limit"),
            "soft_time_limit": _seconds(fields, "soft_time_limit"),
            "enqueued_at": _unix_time(fields, "enqueued_at"),
            "extra": {k: v for k, v in fields.items() if k not in KNOWN_FIELDS}}


def _new_task(values: dict[str, Any]) -> Task:
    """Task(**values) in a third of the time (0.8 against 2.2 us). A frozen dataclass's __init__
    sets each of its 13 fields through object.__setattr__, and decode() runs once per task on the
    dispatcher's hot path. An equal instance, its __dict__ filled in one step (values holds every
    field, in order)."""
    task = object.__new__(Task)
    object.__setattr__(task, "__dict__", values)
    return task


def _text(value: str, name: str) -> None:
    """A string that goes back to Redis (in a key name, a reply, a dead letter) must be valid
    Unicode: a lone surrogate (a JSON escape like \\ud800) cannot be written anywhere."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidTask(f"field '{name}' is not valid Unicode (a lone surrogate): {value!r}"[:500]) from None


def _flag(fields: dict, name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise InvalidTask(f"field '{name}' must be true or false")
    return value


def _count(fields: dict, name: str) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise InvalidTask(f"field '{name}' must be a whole number from 0 to {MAX_COUNT}")
    return value


def _number(fields: dict, name: str) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, bool) and isinstance(value, (int, float)) else None
    except OverflowError:  # a JSON integer beyond any float
        number = None
    if number is None or not math.isfinite(number):
        raise InvalidTask(f"field '{name}' must be a finite number")
    return number


def _unix_time(fields: dict, name: str) -> float | None:
    value = _number(fields, name)
    if value is not None and not 0 <= value <= MAX_UNIX_TIME:
        raise InvalidTask(f"field '{name}' must be a Unix time in seconds, from 0 to {MAX_UNIX_TIME:.0e}")
    return value


def _seconds(fields: dict, name: str) -> float | None:
    value = _number(fields, name)
    if value is not None and not 0 < value <= MAX_SECONDS:
        raise InvalidTask(f"field '{name}' must be a number of seconds > 0 and at most {MAX_SECONDS:.0e}")
    return value
