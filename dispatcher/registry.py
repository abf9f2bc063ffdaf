"""Task registration: only functions registered under a name ever run.

A payload names a registered task, never an import path, so writing to Redis does not let anyone
run arbitrary code. The default registry is the module-level ``registry``; ``task`` is its
decorator. The dispatcher fills it by importing the modules given with ``--tasks``, in the parent
(to validate payloads) and in every child (to run them).
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from dispatcher.errors import ConfigError, InvalidTask, UnknownTask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task and its policy; None means "use the dispatcher's default"."""

    name: str
    fn: Callable[..., Any]
    signature: inspect.Signature | None
    max_retries: int | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None

    @functools.cached_property
    def _positional(self) -> tuple[int, float] | None:
        return _positional_range(self.signature) if self.signature is not None else None

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """Reject arguments that cannot bind, before a child is spent on them."""
        if self.signature is None:
            return
        fits = self._positional
        if fits is not None and not kwargs and fits[0] <= len(args) <= fits[1]:
            return  # the common case, without Signature.bind's cost (once per task)
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidTask(f"args do not fit task {self.name!r}{self.signature}: {exc}") from exc


def _positional_range(signature: inspect.Signature) -> tuple[int, float] | None:
    """(fewest, most) positional arguments that bind with no keywords; None if keywords may be needed."""
    fewest, most = 0, 0.0
    for param in signature.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            most = float("inf")
        elif param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            most += 1
            fewest += param.default is param.empty
        elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
            return None
    return fewest, most


class Registry:
    """Name -> TaskSpec."""

    def __init__(self) -> None:
        self._specs: dict[str, TaskSpec] = {}

    def task(self, fn: Callable | None = None, *, name: str | None = None,
             max_retries: int | None = None, time_limit: float | None = None,
             soft_time_limit: float | None = None) -> Any:
        """Register a function; usable bare (``@task``) or with options (``@task(name=...)``).

        Returns the function unchanged, so it stays an ordinary, picklable, testable function.
        """
        if max_retries is not None and not max_retries >= 0:
            raise ConfigError(f"@task max_retries must be >= 0, got {max_retries!r}")
        for option, value in (("time_limit", time_limit), ("soft_time_limit", soft_time_limit)):
            if value is not None and not value > 0:
                raise ConfigError(f"@task {option} must be > 0, got {value!r}")

        def register(func: Callable) -> Callable:
            task_name = name or f"{func.__module__}.{func.__qualname__}"
            try:
                signature: inspect.Signature | None = inspect.signature(func)
            except (TypeError, ValueError):
                signature = None
            spec = TaskSpec(task_name, func, signature, max_retries, time_limit, soft_time_limit)
            self._add(spec)
            return func

        return register(fn) if fn is not None else register

    def _add(self, spec: TaskSpec) -> None:
        old = self._specs.get(spec.name)
        if old is not None and _origin(old.fn) != _origin(spec.fn):
            raise ConfigError(f"task name {spec.name!r} is registered twice: "
                              f"{_origin(old.fn)} and {_origin(spec.fn)}")
        self._specs[spec.name] = spec

    def get(self, name: str) -> TaskSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownTask(f"unknown task {name!r}; this dispatcher knows: "
                              f"{', '.join(sorted(self._specs)) or 'none'}") from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def import_modules(self, modules: Iterable[str]) -> None:
        """Import task modules so their decorators run; a clear error if one cannot be imported."""
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(f"cannot import task module {module!r}: {exc}") from exc


def _origin(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


registry = Registry()
task = registry.task
