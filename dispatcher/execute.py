"""What runs inside a worker child: look the task up by name, call it, encode its reply.

Encoding happens here, in the child, so the parent's per-task work stays small and a value that
cannot be encoded fails as that task's error rather than in the dispatcher.
"""
from __future__ import annotations

import os
import time
from typing import Any

from dispatcher.codec import encode
from dispatcher.registry import registry
from dispatcher.urgent import Lookout, YieldedToHighTask

# This child's side of the high lane (dispatcher.urgent), given by init_child; None without --prefetch
_lookout: Lookout | None = None


class ResultNotSerializable(TypeError):
    """The task returned something its reply codec cannot carry."""


def init_child(modules: tuple[str, ...], lookout: Lookout | None = None) -> None:
    """Pool initializer: register the same tasks in the child as in the parent."""
    global _lookout
    _lookout = lookout
    if lookout is not None:
        lookout.connect()
    registry.import_modules(modules)


def warm_up(seconds: float) -> int:
    """The warm-up job (``dispatcher.warmup``): it can only run once a child has started and
    imported the task modules. It sleeps, so that each idle child takes one of a round rather
    than one child taking them all; the pid says which child ran it."""
    time.sleep(seconds)
    return os.getpid()


def run(name: str, args: tuple, kwargs: dict, task_id: str, codec: str, want_reply: bool,
        high: int = 0) -> bytes | None:
    """Run one task; returns the encoded "ok" reply when someone asked for it.

    ``high`` is 0 for a task that is not high: it is handed back unrun (YieldedToHighTask) while
    a high one waits. A high task's is -1, or its number if others wait for it (dispatcher.urgent).
    """
    if _lookout is not None:
        if high > 0:
            _lookout.bar.taken(high)
        elif not high and _lookout.must_yield():
            raise YieldedToHighTask(f"{name} {task_id} handed back: a high task waits")
    value = registry.get(name).fn(*args, **kwargs)
    if not want_reply:
        return None
    try:
        return encode(codec, ok_reply(task_id, name, value))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ResultNotSerializable(
            f"task {name!r} returned a {type(value).__name__}, which cannot be sent as {codec}: {exc}"
        ) from None


def ok_reply(task_id: str, name: str, value: Any) -> dict[str, Any]:
    return {"id": task_id, "task": name, "status": "ok", "result": value}


def error_reply(task_id: str, name: str, error_type: str, message: str, traceback: str,
                attempts: int) -> dict[str, Any]:
    return {"id": task_id, "task": name, "status": "error", "error": error_type,
            "message": message, "traceback": traceback, "attempts": attempts}
