"""Run the real CLI (`python -m dispatcher ...`) as a child process for end-to-end tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
sys.path.insert(0, str(ROOT / "scripts"))

from chaos import pool_children  # noqa: E402,F401  (re-exported: the chaos script and the tests kill the same children)


def wait_for(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> object:
    """Poll a condition with a deadline (tests never sleep a fixed time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(*args: str, url: str | None = None, timeout: float = 30.0, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "dispatcher", *args]
    if url:
        argv += ["--redis-url", url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=cli_env(env),
                          cwd=str(TESTS_DIR))
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


class DispatcherProcess:
    """One `python -m dispatcher` child; its log goes to a file the test can read."""

    def __init__(self, url: str, log_path: Path, *args: str, env: dict | None = None) -> None:
        self.log_path = log_path
        self.argv = [sys.executable, "-m", "dispatcher", *(["--redis-url", url] if url else []), *args]
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=cli_env(env), cwd=str(TESTS_DIR))

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> "DispatcherProcess":
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"dispatcher exited {self.proc.returncode}:\n{self.log}")
            return " ready: " in self.log
        wait_for(ready, timeout, what="dispatcher ready")
        return self

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dispatcher did not exit within {timeout}s:\n{self.log}") from None

    def kill(self) -> None:
        """SIGKILL the dispatcher and its whole pool (the children die with the forkserver's pipes)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
