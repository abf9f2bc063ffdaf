"""Shared fixtures: real Redis servers on random loopback ports, started by the product's own code.

Servers come from ``dispatcher.server.start_server``, the code the dispatcher runs, so the suite
tests that path too. Every server a test starts is killed in teardown, never in the test body,
however the test ended; a machine-wide Redis on 127.0.0.1:6379 is never used.
"""
from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from dispatcher import Client
from dispatcher.errors import ServerNotFound
from procs import DispatcherProcess
from dispatcher.binaries import find_server_binary
from dispatcher.server import RedisServer, recorded_server, start_server

DEFAULT_TIMEOUT = 60  # seconds; setup.cfg sets the same, this covers runs that bypass it


class Servers:
    """Starts and remembers servers (and state dirs) so teardown can kill whatever is left.

    Tracking the RedisServer object also covers restarts: kill() acts on its current process.
    Watching a state dir covers servers started elsewhere (a subprocess, resolve_server): at
    teardown, whatever server.json there names as still running is killed too.
    """

    def __init__(self, root: Path, binary: Path) -> None:
        self.root = root
        self.binary = binary
        self._servers: list[RedisServer] = []
        self._dirs: list[Path] = []

    def start(self, name: str = "redis", **kwargs) -> RedisServer:
        kwargs.setdefault("binary", self.binary)
        return self.track(start_server(self.watch(self.root / name), **kwargs))

    def first(self) -> RedisServer:
        """The first server started here, starting one if there is none yet."""
        return self._servers[0] if self._servers else self.start()

    def track(self, server: RedisServer) -> RedisServer:
        self._servers.append(server)
        return server

    def watch(self, state_dir: Path) -> Path:
        self._dirs.append(state_dir)
        return state_dir

    def kill_all(self) -> None:
        """kill() is a no-op for servers that are not ours (a url or local source)."""
        while self._servers:
            self._servers.pop().kill()
        while self._dirs:
            leftover = recorded_server(self._dirs.pop())
            if leftover is not None:
                leftover.kill()


_PENDING: list[Servers] = []


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if the run is interrupted before teardown: servers run in their own session."""
    for servers in _PENDING:
        servers.kill_all()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test gets a timeout even when setup.cfg is not read (pytest -c, another rootdir)."""
    if config.getoption("timeout", None) or config.getini("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.fixture(scope="session")
def server_binary() -> Path:
    """The binary the product would start; missing it fails in CI (CI=true), skips elsewhere."""
    try:
        return find_server_binary()
    except ServerNotFound as exc:
        message = f"tests need a Redis server binary: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _tracked(root: Path, binary: Path) -> Iterator[Servers]:
    tracker = Servers(root, binary)
    _PENDING.append(tracker)
    try:
        yield tracker
    finally:
        tracker.kill_all()
        _PENDING.remove(tracker)


@pytest.fixture
def servers(tmp_path: Path, server_binary: Path) -> Iterator[Servers]:
    yield from _tracked(tmp_path, server_binary)


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory, server_binary: Path) -> Iterator[Servers]:
    """For a module whose tests share one server (hypothesis runs many examples against it)."""
    yield from _tracked(tmp_path_factory.mktemp("servers"), server_binary)


@pytest.fixture(scope="module")
def r_module(module_servers: Servers) -> Iterator[redis.Redis]:
    """A client of the module's first server (started on first use)."""
    server = module_servers.first()
    client = redis.Redis.from_url(server.url, socket_timeout=10)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_server(servers: Servers) -> RedisServer:
    """A fresh server on a free loopback port, AOF everysec, data in tmp_path/redis."""
    return servers.start("redis", port=None)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def start(redis_url: str, tmp_path: Path) -> Iterator:
    """start(*flags, tasks=("e2e_tasks",)) -> a ready `python -m dispatcher` serving the test tasks.

    Every dispatcher started is stopped in teardown (SIGTERM, then SIGKILL)."""
    started: list[DispatcherProcess] = []

    def _start(*flags: str, tasks: tuple[str, ...] = ("e2e_tasks",), ready: bool = True) -> DispatcherProcess:
        task_flags = [f for t in tasks for f in ("--tasks", t)]
        proc = DispatcherProcess(redis_url, tmp_path / f"dispatcher-{len(started)}.log", *task_flags, *flags)
        started.append(proc)
        return proc.wait_ready() if ready else proc

    yield _start
    for proc in started:
        proc.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[Client]:
    with Client(redis_url) as c:
        yield c


@pytest.fixture
def closed_url() -> str:
    """A loopback URL where nothing listens: stands in for 127.0.0.1:6379, which tests never use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"
