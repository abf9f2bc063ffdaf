"""The dispatcher's configuration: one frozen, validated value built once by the CLI.

Defaults live here and only here; nothing below the CLI reads the environment or argv.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dispatcher.errors import ConfigError
from dispatcher.keys import DEFAULT_PREFIX

MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything a Dispatcher needs to know; see ``python -m dispatcher --help`` for each."""

    redis_url: str | None = None
    prefix: str = DEFAULT_PREFIX
    procs: int = field(default_factory=lambda: os.cpu_count() or 1)
    task_modules: tuple[str, ...] = ()
    name: str | None = None
    grace: float = 30.0
    result_ttl: int = 24 * 3600
    max_size: int = MiB
    heartbeat_ttl: float = 15.0
    time_limit: float | None = None
    soft_time_limit: float | None = None
    kill_grace: float = 2.0
    max_retries: int = 3
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    batch: int = 64
    prefetch: int = 0
    batch_budget: float = 0.002
    start_method: str = "forkserver"
    state_dir: Path = Path(".")

    def __post_init__(self) -> None:
        checks = [
            (self.procs >= 1, "--procs must be at least 1"),
            (bool(self.prefix) and not any(c.isspace() for c in self.prefix),
             "--prefix must be non-empty and have no spaces"),
            (self.grace >= 0, "--grace must be >= 0"),
            (self.result_ttl >= 1, "--result-ttl must be >= 1 second"),
            (self.max_size >= 64, "--max-size must be >= 64 bytes"),
            (self.heartbeat_ttl >= 1, "--heartbeat-ttl must be >= 1 second"),
            (self.time_limit is None or self.time_limit > 0, "--time-limit must be > 0"),
            (self.soft_time_limit is None or self.soft_time_limit > 0, "--soft-time-limit must be > 0"),
            (self.kill_grace >= 0, "--kill-grace must be >= 0"),
            (self.max_retries >= 0, "--max-retries must be >= 0"),
            (self.retry_backoff >= 0 and self.retry_backoff_max >= 0, "retry backoff must be >= 0"),
            (self.batch >= 1, "--batch must be >= 1"),
            (self.prefetch >= 0, "--prefetch must be >= 0"),
            (0 <= self.batch_budget <= 60, "--batch-budget must be between 0 and 60 seconds"),
            (self.start_method in ("forkserver", "spawn", "fork"),
             "--start-method must be forkserver, spawn or fork"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def slots(self) -> int:
        """Tasks this dispatcher may hold at once: one per child, plus the prefetched ones
        queued in the pool. The size of its token list."""
        return self.procs + self.prefetch

    @property
    def refill_at(self) -> int:
        """Free slots the loop waits for before it fetches: one, or half the prefetch (at most
        --batch, the most one fetch takes). A deep prefetch is refilled by halves rather than by
        one task (and one more script call in Redis) per finished one; the other half still
        waits in the pool meanwhile."""
        return max(1, min(self.prefetch // 2, self.batch))
