"""The exception tree. Everything the package raises on purpose is a DispatcherError.

Kept at the bottom of the import graph so every other module can raise these without cycles.
"""
from __future__ import annotations


class DispatcherError(Exception):
    """Base of every error raised on purpose by redis-dispatcher."""


class ConfigError(DispatcherError, ValueError):
    """A setting or a command-line value that cannot work."""


class ServerNotFound(DispatcherError):
    """No Redis server could be found or started; the message lists the options."""


class InvalidTask(DispatcherError, ValueError):
    """A queue element that cannot run; the message is the reason stored with the dead letter."""


class UnknownTask(InvalidTask):
    """The element names a task no module registered."""


class TaskFailed(DispatcherError):
    """The task ran and raised; carries the remote error type, message and traceback."""

    def __init__(self, task_id: str, error_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"task {task_id} failed: {error_type}: {message}")
        self.task_id = task_id
        self.error_type = error_type
        self.message = message
        self.traceback = traceback

    def __str__(self) -> str:
        base = super().__str__()
        if self.traceback:
            return f"{base}\n--- remote traceback ---\n{self.traceback.rstrip()}"
        return base


class ResultTimeout(DispatcherError, TimeoutError):
    """No result arrived within the caller's timeout; the task may still run later."""


class ConnectionLost(DispatcherError, ConnectionError):
    """Redis could not be reached; raised at the Redis boundary with the cause chained."""


class UnpackableItems(DispatcherError):
    """Outcomes that could not be packed for Redis (a string that is not valid Unicode, an
    integer past 64 bits): ``bad`` are their indexes in the batch, and nothing was written.
    The batch is sent again without them; kept, they would fail every send, for good."""

    def __init__(self, bad: list[int], why: str) -> None:
        super().__init__(f"{len(bad)} outcome(s) could not be packed: {why}")
        self.bad = bad
        self.why = why


class BrokenKey(DispatcherError):
    """One of the keys a fetch needs holds another type (set by hand, say). The fetch took
    nothing; the message names the key."""


class LostId(DispatcherError):
    """Another process holds this dispatcher's id now: this one was cut off from Redis, or
    paused, for longer than the heartbeat TTL, and the id was claimed meanwhile. The message is
    the other's heartbeat. Nothing was written; this process must stop."""
