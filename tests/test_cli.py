"""The CLI's answer to input it cannot use: one line on stderr and a documented exit code, no traceback.

Every test runs the real `python -m dispatcher` against a server the test started (or against
nothing, when the input is refused before any connection).
"""
from __future__ import annotations

import pytest

from procs import run_cli

pytestmark = pytest.mark.timeout(90)

EXIT_ERROR = 2  # the exit code for every error below (see `python -m dispatcher --help`)
SHORT_COMMANDS = [("status",), ("enqueue", "example.square", "[1]"), ("dead", "list")]


def one_line_error(proc) -> str:
    """The error line; fails unless the CLI exited 2 with exactly one line on stderr."""
    assert proc.returncode == EXIT_ERROR, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("url", ["http://127.0.0.1:6392", "garbage", "redis://127.0.0.1:notaport/0"])
@pytest.mark.parametrize("command", [(), ("run",), *SHORT_COMMANDS])
def test_a_malformed_redis_url_is_one_line(command, url, tmp_path):
    proc = run_cli(*command, "--state-dir", str(tmp_path), url=url)
    line = one_line_error(proc)
    assert "--redis-url" in line and url in line


def test_a_malformed_redis_url_from_the_environment_is_one_line(tmp_path):
    line = one_line_error(run_cli("status", "--state-dir", str(tmp_path), env={"REDIS_URL": "garbage"}))
    assert "REDIS_URL" in line and "garbage" in line


def test_a_malformed_local_url_is_one_line(tmp_path):
    line = one_line_error(run_cli("status", "--state-dir", str(tmp_path), "--local-url", "garbage"))
    assert "--local-url" in line


def test_a_password_in_a_malformed_url_stays_hidden(tmp_path):
    line = one_line_error(run_cli("status", "--state-dir", str(tmp_path), url="http://:s3cret@127.0.0.1:1/0"))
    assert "s3cret" not in line
