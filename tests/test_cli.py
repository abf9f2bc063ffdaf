"""The CLI's answer to input it cannot use: one line on stderr and a documented exit code, no traceback.

Every test runs the real `python -m dispatcher` against a server the test started (or against
nothing, when the input is refused before any connection).
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

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


def with_userinfo(url: str, userinfo: str) -> str:
    return url.replace("redis://", f"redis://{userinfo}@", 1)


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


@pytest.mark.parametrize("command", [("--procs", "1"), *SHORT_COMMANDS])
def test_a_database_the_server_does_not_have_is_one_line(command, redis_url, r):
    line = one_line_error_or_last(run_cli(*command, url=redis_url.rsplit("/", 1)[0] + "/99"), command)
    assert "database 99" in line
    assert r.dbsize() == 0


def one_line_error_or_last(proc, command: tuple[str, ...]) -> str:
    """`run` logs its start before it meets the server's refusal: only its last line must be the error."""
    if command and command[0] in ("status", "enqueue", "dead"):
        return one_line_error(proc)
    assert proc.returncode == EXIT_ERROR, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, kwargs, expected", [
    ("[NaN]", "{}", "NaN"),
    ("[1e999]", "{}", "Infinity"),
    ("[-Infinity]", "{}", "Infinity"),
    ("[1]", '{"x": NaN}', "NaN"),
    ('["\\ud800"]', "{}", "surrogate"),
    ('["\udcff"]', "{}", "surrogate"),  # a byte that is not UTF-8 in argv itself
])
def test_enqueue_arguments_json_cannot_carry_are_one_line(args, kwargs, expected, redis_url, r):
    line = one_line_error(run_cli("enqueue", "example.square", args, "--kwargs", kwargs, url=redis_url))
    assert expected in line
    assert r.llen("dispatcher:normal") == 0


@pytest.fixture
def password(r: redis.Redis, redis_url: str) -> Iterator[str]:
    """The test's own server asks for a password ("pw") until the test ends."""
    r.config_set("requirepass", "pw")
    try:
        yield "pw"
    finally:
        with redis.Redis.from_url(with_userinfo(redis_url, ":pw")) as admin:
            admin.config_set("requirepass", "")


@pytest.mark.parametrize("command", [("run", "--procs", "1"), *SHORT_COMMANDS])
def test_a_wrong_password_is_one_line(command, password, redis_url, r):
    """run too: it used to retry for ever, as if Redis were away, after one ERROR line."""
    line = one_line_error_or_last(run_cli(*command, url=with_userinfo(redis_url, ":wrongpw")), command)
    assert "refused the password" in line and "wrongpw" not in line
    assert r.llen("dispatcher:normal") == 0


@pytest.mark.parametrize("command", [("run", "--procs", "1"), *SHORT_COMMANDS])
def test_a_missing_password_is_one_line(command, password, redis_url):
    line = one_line_error_or_last(run_cli(*command, url=redis_url), command)
    assert "password" in line


def test_the_right_password_works(password, redis_url):
    assert run_cli("status", url=with_userinfo(redis_url, ":pw")).returncode == 0


def test_an_acl_user_without_the_rights_is_one_line(redis_url, r):
    r.acl_setuser("watcher", enabled=True, passwords=["+secret"], commands=["+ping"], keys=["*"])
    line = one_line_error(run_cli("status", url=with_userinfo(redis_url, "watcher:wrong")))
    assert "refused the password" in line
    line = one_line_error(run_cli("status", url=with_userinfo(redis_url, "watcher:secret")))
    assert "permission" in line


@pytest.mark.parametrize("command", [("--procs", "1"), ("run", "--procs", "1"), *SHORT_COMMANDS])
def test_an_empty_prefix_is_refused(command, redis_url, r):
    line = one_line_error(run_cli(*command, "--prefix", "", url=redis_url))
    assert "--prefix" in line
    assert r.dbsize() == 0


def test_an_empty_prefix_variable_means_the_default(redis_url):
    proc = run_cli("status", "--json", url=redis_url, env={"DISPATCHER_PREFIX": ""})
    assert proc.returncode == 0, proc.stderr


def test_help_documents_the_exit_codes():
    out = run_cli("--help", check=True).stdout
    assert "exit" in out.lower() and "2" in out
