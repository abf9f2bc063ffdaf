"""The command line: ``python -m dispatcher`` (or the ``dispatcher`` script).

The only module that reads argv and the environment, configures logging and prints. Environment
variables map onto flags in ENV_FLAGS and nowhere else.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

import redis
from redis.connection import parse_url
from redis.exceptions import NoPermissionError

from dispatcher import cli_tools
from dispatcher.dispatcher import Dispatcher
from dispatcher.errors import ConfigError, ConnectionLost, DispatcherError
from dispatcher.keys import DEFAULT_PREFIX, Keys
from dispatcher.registry import registry
from dispatcher.server import DEFAULT_LOCAL_URL, default_state_dir, mask_url, resolve_server
from dispatcher.settings import Settings
from dispatcher.store import REDIS_DOWN, Store, connect

logger = logging.getLogger("dispatcher")

EXAMPLE_TASKS = "dispatcher.example"
# environment variable -> the flag it stands for (a flag on the command line wins)
ENV_FLAGS = {"REDIS_URL": "redis_url", "DISPATCHER_PREFIX": "prefix", "DISPATCHER_STATE_DIR": "state_dir",
             "DISPATCHER_LOCAL_URL": "local_url"}
EXIT_ERROR = 2  # for every error main() reports in one line
EXIT_CODES = ("exit codes: 0 done; 1 the task failed (enqueue --wait), a dead letter was not found "
              "or could not be requeued (dead requeue), or the dispatcher lost its id to another "
              "process (run); 2 a flag, URL or argument that cannot work, or Redis unreachable or "
              "refusing the password, the database or a command; 3 no result within --timeout "
              "(enqueue --wait)")


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--redis-url", default=default, metavar="URL",
                        help="Redis to use (env REDIS_URL). Default: a Redis >= 7 answering on "
                             "127.0.0.1:6379, else the bundled server (started by `run`)")
    parser.add_argument("--prefix", default=default,
                        help=f"key prefix, not empty (env DISPATCHER_PREFIX, where empty means unset; "
                             f"default {DEFAULT_PREFIX!r}); use a {{hash tag}} on Redis Cluster")
    parser.add_argument("--state-dir", default=default, type=Path, metavar="DIR",
                        help="where a bundled server keeps its data, AOF and log (env "
                             "DISPATCHER_STATE_DIR; default $XDG_STATE_HOME/redis-dispatcher)")
    parser.add_argument("--local-url", default=default, metavar="URL",
                        help="where to look for an already running Redis before starting the bundled "
                             f"one (env DISPATCHER_LOCAL_URL; default {DEFAULT_LOCAL_URL})")
    parser.add_argument("--log-level", default=default, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dispatcher",
        description="Feed tasks from the Redis lists <prefix>:high, :normal and :low to a pool of "
                    "worker processes, highest priority first. Without a command: run the dispatcher.",
        epilog=EXIT_CODES)
    _common(parser, suppress=False)
    _run_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the dispatcher (the default)")
    _common(run, suppress=True)
    _run_flags(run, suppress=True)
    cli_tools.add_commands(sub, lambda p: _common(p, suppress=True))
    return parser


def _run_flags(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    d = Settings.__dataclass_fields__

    def default(name: str) -> object:
        if suppress:
            return argparse.SUPPRESS
        f = d[name]
        return f.default_factory() if callable(f.default_factory) else f.default

    p.add_argument("--procs", type=int, default=default("procs"), help="worker processes (default: CPUs)")
    p.add_argument("--tasks", action="append", metavar="MODULE", default=argparse.SUPPRESS,
                   help="import this module to register its tasks (repeatable); "
                        "default: the example tasks")
    p.add_argument("--name", default=default("name"),
                   help="dispatcher id (default: HOST-N, the first free one; a restart takes its old id)")
    p.add_argument("--grace", type=float, default=default("grace"),
                   help="seconds running tasks may finish after SIGINT/SIGTERM (default 30)")
    p.add_argument("--result-ttl", type=int, default=default("result_ttl"),
                   help="seconds results are kept (default 86400)")
    p.add_argument("--max-size", type=int, default=default("max_size"),
                   help="largest task element in bytes; larger ones are dead-lettered (default 1 MiB)")
    p.add_argument("--time-limit", type=float, default=default("time_limit"),
                   help="hard time limit per task in seconds (default none)")
    p.add_argument("--soft-time-limit", type=float, default=default("soft_time_limit"),
                   help="raise SoftTimeLimitExceeded in a task after this many seconds (default none)")
    p.add_argument("--kill-grace", type=float, default=default("kill_grace"),
                   help="seconds between SIGTERM and SIGKILL for a task over its hard limit (default 2)")
    p.add_argument("--max-retries", type=int, default=default("max_retries"),
                   help="retries of a failed task before it is dead-lettered (default 3)")
    p.add_argument("--retry-backoff", type=float, default=default("retry_backoff"),
                   help="first retry delay in seconds, doubled each time, with jitter (default 1)")
    p.add_argument("--retry-backoff-max", type=float, default=default("retry_backoff_max"),
                   help="longest retry delay in seconds (default 300)")
    p.add_argument("--heartbeat-ttl", type=float, default=default("heartbeat_ttl"),
                   help="seconds without a heartbeat before peers put this dispatcher's tasks "
                        "back (default 15)")
    p.add_argument("--batch", type=int, default=default("batch"),
                   help="most tasks taken in one fetch; never more than free workers (default 64)")
    p.add_argument("--prefetch", type=int, default=default("prefetch"),
                   help="tasks taken beyond the idle children, queued in the pool for whichever "
                        "child frees first; raises throughput of sub-millisecond tasks, but up to "
                        "this many tasks may start ahead of a newly pushed higher-priority one "
                        "(default 0: a task is taken only for an idle child)")
    p.add_argument("--batch-budget", type=float, default=default("batch_budget"),
                   help="with --prefetch, tasks whose recent runs were all quick go to a child "
                        "several at a time, up to this many seconds of such work per batch; 0: "
                        "never (default 0.002)")
    p.add_argument("--start-method", default=default("start_method"),
                   choices=["forkserver", "spawn", "fork"], help="multiprocessing start method")


def _apply_env(args: argparse.Namespace, env: dict[str, str]) -> None:
    for var, dest in ENV_FLAGS.items():
        if getattr(args, dest, None) is None and env.get(var):
            setattr(args, dest, env[var])
    args.prefix = DEFAULT_PREFIX if args.prefix is None else args.prefix
    args.local_url = args.local_url or DEFAULT_LOCAL_URL
    args.state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(env)


def check_args(args: argparse.Namespace) -> None:
    """Refuse what cannot work before anything connects or starts, in one line.

    Otherwise redis-py meets a bad URL only at the first connection, and the JSON encoder bad
    enqueue arguments only after it, both as a traceback; and an empty --prefix would quietly
    become the default, so a producer using the empty one would feed lists nobody reads.
    """
    if args.prefix == "":
        raise ConfigError(f"--prefix must not be empty (leave it out for {DEFAULT_PREFIX!r})")
    _check_url(args.redis_url, "redis_url")
    _check_url(args.local_url, "local_url")


def _check_url(url: str | None, dest: str) -> None:
    """Name the flag and its variable: the URL may have come from either."""
    if not url:
        return
    try:
        parse_url(url)  # what redis.Redis.from_url does with it
    except ValueError as exc:
        var = next(v for v, d in ENV_FLAGS.items() if d == dest)
        flag = "--" + dest.replace("_", "-")
        raise ConfigError(f"{flag} (or {var}) {mask_url(url)!r} is not a Redis URL: {exc}") from exc


def settings_from(args: argparse.Namespace, redis_url: str) -> Settings:
    modules = tuple(getattr(args, "tasks", None) or (EXAMPLE_TASKS,))
    return Settings(
        redis_url=redis_url, prefix=args.prefix, procs=args.procs, task_modules=modules,
        name=args.name, grace=args.grace, result_ttl=args.result_ttl, max_size=args.max_size,
        heartbeat_ttl=args.heartbeat_ttl, time_limit=args.time_limit,
        soft_time_limit=args.soft_time_limit, kill_grace=args.kill_grace, max_retries=args.max_retries,
        retry_backoff=args.retry_backoff, retry_backoff_max=args.retry_backoff_max, batch=args.batch,
        prefetch=args.prefetch, batch_budget=args.batch_budget, start_method=args.start_method,
        state_dir=args.state_dir,
    )


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "tasks", None):
        logger.info("no --tasks given: serving the example tasks (%s)", EXAMPLE_TASKS)
    settings = settings_from(args, args.redis_url)  # validates before anything starts
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # --tasks modules next to the user, as with `python -m`
    registry.import_modules(settings.task_modules)
    server = resolve_server(args.redis_url, args.state_dir, local_url=args.local_url)
    try:
        return _serve(settings, server)
    finally:
        server.stop()


def _serve(settings: Settings, server: object) -> int:
    keys = Keys(settings.prefix)
    client = connect(server.url, retries=0)  # see connect(): the loop reconciles instead
    logger.info("redis: %s (%s)", mask_url(server.url), server.source)
    if server.state_dir is not None:
        logger.info("the server it started keeps its data (AOF) in %s", server.state_dir)
    logger.info("queues: %s (highest priority first)", ", ".join(keys.queues))
    logger.info("tasks: %s", ", ".join(registry.names()) or "none")
    logger.info("pool: %d worker process(es)", settings.procs)
    dispatcher = Dispatcher(settings, client, Store(client, keys), registry)
    dispatcher.install_signal_handlers()
    return dispatcher.run()


def _one_line(exc: Exception, url: str) -> str | None:
    """What to tell the user about an error they can fix; None for one that is a bug.

    url is the one in use (for a server this project started: the local URL, but such a server
    has no password and no database to refuse).
    """
    cause = exc.__cause__ if isinstance(exc, ConnectionLost) else exc  # what Redis said
    where = f"Redis at {mask_url(url)}"
    if isinstance(cause, redis.AuthenticationError):  # also a ConnectionError: ask first
        if parse_url(url).get("password"):
            return f"{where} refused the password in the URL: {cause}"
        return f"{where} wants a password: give it in the URL (redis://[USER]:PASSWORD@HOST:PORT/DB)"
    if isinstance(exc, DispatcherError):
        return str(exc)
    if isinstance(exc, REDIS_DOWN):
        return f"Redis is unreachable: {exc}"
    if isinstance(exc, NoPermissionError):
        return f"{where} refused a command: the URL's user lacks a permission: {exc}"
    # redis-py has no class for it; Redis and Valkey both say this when SELECT is refused
    if isinstance(exc, redis.ResponseError) and str(exc).startswith("DB index is out of range"):
        return (f"{where} has no database {parse_url(url).get('db')}: {exc} (a server has "
                "databases 0-15 unless its `databases` setting says otherwise)")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_env(args, dict(os.environ))
    logging.basicConfig(level=getattr(logging, args.log_level or "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
        if args.command in (None, "run"):
            return run(args)
        return args.handler(args)
    except (DispatcherError, redis.RedisError) as exc:
        message = _one_line(exc, args.redis_url or args.local_url)
        if message is None:
            raise
        logger.error("%s", message)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
