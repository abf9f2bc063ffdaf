"""redis-dispatcher: a priority work queue on plain Redis lists, feeding a pool of worker processes.

    from dispatcher import task, Client

    @task(name="media.thumbnail")
    def thumbnail(path): ...

    Client().enqueue("media.thumbnail", "/tmp/a.png", priority="high").result(timeout=30)
"""
from dispatcher.client import Call, Client, TaskHandle
from dispatcher.errors import (ConfigError, ConnectionLost, DispatcherError, InvalidTask,
                               ResultTimeout, ServerNotFound, TaskFailed, UnknownTask)
from dispatcher.registry import Registry, registry, task

__all__ = [
    "Call", "Client", "TaskHandle", "task", "registry", "Registry",
    "DispatcherError", "ConfigError", "ConnectionLost", "InvalidTask", "UnknownTask",
    "ResultTimeout", "ServerNotFound", "TaskFailed",
]
__version__ = "0.1.0"
