#!/usr/bin/env python3
"""Chaos run: does redis-dispatcher lose a task when children, dispatchers and Redis die?

Enqueues N tasks (each records its id in Redis when it runs), runs two dispatchers, and while
they work SIGKILLs random worker children and dispatchers (restarting the dispatchers) K times at
random moments, and SIGKILLs and restarts the Redis server once (AOF everysec). Prints enqueued,
completed (unique), lost and duplicated; exits 1 if anything was lost. Linux only (reads /proc).

    python scripts/chaos.py                 # N=5000, K=10
    python scripts/chaos.py -n 300 -k 5     # the short version the test suite runs
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import redis  # noqa: E402

from dispatcher import Call, Client  # noqa: E402
from dispatcher.server import start_server  # noqa: E402

RAN_KEY = "chaos:ran"
STARTUP = 2.0  # seconds a dispatcher may take to set its signal handlers (imports, pool)


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def pool_children(dispatcher_pid: int) -> list[int]:
    """Worker processes: children of the dispatcher's forkserver (or of the dispatcher itself)."""
    workers = []
    for child in children_of(dispatcher_pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"forkserver" in cmdline:
            workers += children_of(child)
        elif b"resource_tracker" not in cmdline and b"server" not in cmdline:
            workers.append(child)
    return workers


class Dispatchers:
    def __init__(self, url: str, workdir: Path, procs: int, prefetch: int, log_level: str) -> None:
        self.url = url
        self.workdir = workdir
        self.procs = procs
        self.prefetch = prefetch
        self.log_level = log_level
        self.procs_by_slot: dict[int, subprocess.Popen] = {}
        self.started_at: dict[int, float] = {}
        self.starts = 0

    def start(self, slot: int) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]),
                   PYTHONUNBUFFERED="1")
        log = open(self.workdir / f"dispatcher-{slot}.log", "ab")
        self.procs_by_slot[slot] = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--redis-url", self.url, "--procs", str(self.procs),
             "--prefetch", str(self.prefetch), "--log-level", self.log_level,
             "--tasks", "chaos_tasks", "--heartbeat-ttl", "3", "--retry-backoff", "0.1",
             "--retry-backoff-max", "1", "--grace", "10", "--name", f"chaos-{slot}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir))
        self.started_at[slot] = time.monotonic()
        self.starts += 1

    def kill(self, slot: int) -> None:
        proc = self.procs_by_slot[slot]
        proc.kill()
        proc.wait()

    def stop_all(self) -> list[int]:
        # A dispatcher restarted a moment ago may not have set its signal handlers yet: SIGTERM
        # would end it as the default action does (-15), which is not what is being tested
        youngest = max(self.started_at.values(), default=0.0)
        time.sleep(max(0.0, youngest + STARTUP - time.monotonic()))
        for proc in self.procs_by_slot.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return [proc.wait(60) for proc in self.procs_by_slot.values()]


def enqueue(url: str, ids: list[str], most_seconds: float, priorities: tuple[str, ...]) -> None:
    """Chunks of 500, taking turns through the priorities."""
    with Client(url) as client:
        for chunk, start in enumerate(range(0, len(ids), 500)):
            client.enqueue_many([Call("chaos.record", (url, RAN_KEY, i, most_seconds))
                                 for i in ids[start:start + 500]],
                                priority=priorities[chunk % len(priorities)], result=False)


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    server = start_server(workdir / "redis", appendfsync="everysec")
    r = redis.Redis.from_url(server.url, socket_timeout=5)
    events: list[str] = []
    try:
        ids = [f"c{i}" for i in range(args.n)]
        # --highs: that many of them are pushed high, ten at a time, once Redis is back (a push
        # just before its SIGKILL could be lost with the last second of its AOF, not by us)
        highs = ids[args.n - args.highs:]
        enqueue(server.url, ids[:args.n - args.highs], args.task_seconds,
                ("normal", "low") if args.highs else ("normal",))
        time.sleep(1.2)  # past one AOF fsync: the enqueued tasks are on disk before chaos starts
        dispatchers = Dispatchers(server.url, workdir, args.procs, args.prefetch, args.log_level)
        for slot in (0, 1):
            dispatchers.start(slot)
        # the K kills and the Redis restart fire when the run reaches random points of its progress
        kill_points = sorted(int(rng.uniform(0.02, 0.9) * args.n) for _ in range(args.k))
        # (before the high tasks, which are pushed once it is back)
        redis_point, redis_restarted = int(rng.uniform(0.2, 0.7) * (args.n - args.highs)), False
        deadline = time.monotonic() + args.timeout
        last_progress, last_count = time.monotonic(), -1
        while time.monotonic() < deadline:
            time.sleep(0.05)
            done = _count_unique(r)
            if done is not None and done != last_count:
                last_progress, last_count = time.monotonic(), done
            if done is not None and done >= args.n:
                break
            if time.monotonic() - last_progress > args.stall:
                events.append(f"stalled at {done} for {args.stall}s")
                break
            if not redis_restarted and done is not None and done >= redis_point:
                server.kill()
                events.append(f"redis SIGKILL at {done} done")
                time.sleep(args.redis_down)
                server.restart()
                redis_restarted = True
                events.append("redis restarted")
            elif redis_restarted and highs:
                enqueue(server.url, highs[:10], args.task_seconds, ("high",))
                del highs[:10]
            elif kill_points and done is not None and done >= kill_points[0]:
                kill_points.pop(0)
                events.append(f"at {done} done: " + _kill_something(rng, dispatchers))
        codes = dispatchers.stop_all()
        ran = [v.decode() for v in r.lrange(RAN_KEY, 0, -1)]
        unique = set(ran)
        summary = {
            "enqueued": len(ids), "completed_unique": len(unique & set(ids)),
            "lost": len(set(ids) - unique), "duplicated": len(ran) - len(unique),
            "dead_letters": r.llen("dispatcher:dead"), "events": events,
            "dispatcher_starts": dispatchers.starts, "exit_codes": codes, "workdir": str(workdir),
        }
    finally:
        server.stop()
    # Its logs and the server's files are for a run that went wrong; a good one leaves nothing
    # (each run of the test suite made one, 5 MB, that stayed)
    stalled = any(event.startswith("stalled") for event in summary["events"])
    if not summary["lost"] and not stalled and all(code == 0 for code in summary["exit_codes"]):
        shutil.rmtree(workdir, ignore_errors=True)
        summary["workdir"] = "(removed: nothing went wrong)"
    return summary


def _count_unique(r: redis.Redis) -> int | None:
    try:
        return len(set(r.lrange(RAN_KEY, 0, -1)))
    except redis.RedisError:
        return None


def _kill_something(rng: random.Random, dispatchers: Dispatchers) -> str:
    slot = rng.choice(sorted(dispatchers.procs_by_slot))
    proc = dispatchers.procs_by_slot[slot]
    workers: list[int] = []
    if rng.random() < 0.6:  # a child: wait for the pool to be up (a restarted dispatcher takes a moment)
        deadline = time.monotonic() + 3
        while not workers and proc.poll() is None and time.monotonic() < deadline:
            workers = pool_children(proc.pid)
            time.sleep(0.05)
    if workers:
        victim = rng.choice(workers)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            return f"child {victim} of dispatcher {slot} was already gone"
        return f"SIGKILL child {victim} of dispatcher {slot}"
    dispatchers.kill(slot)
    dispatchers.start(slot)
    return f"SIGKILL dispatcher {slot} (pid {proc.pid}) and restart it"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="tasks to enqueue (default 5000)")
    parser.add_argument("-k", type=int, default=10, help="children/dispatchers to kill (default 10)")
    parser.add_argument("--procs", type=int, default=2, help="workers per dispatcher (default 2)")
    parser.add_argument("--prefetch", type=int, default=0, help="--prefetch of each dispatcher (default 0)")
    parser.add_argument("--log-level", default="INFO", help="the dispatchers' --log-level (default INFO; "
                        "DEBUG logs every task and batch)")
    parser.add_argument("--task-seconds", type=float, default=0.02, help="most sleep per task (default 0.02)")
    parser.add_argument("--redis-down", type=float, default=2.0, help="seconds Redis stays down (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    parser.add_argument("--stall", type=float, default=60, help="give up after this long without progress")
    parser.add_argument("--highs", type=int, default=0,
                        help="of the N, push this many as high tasks during the run (the rest "
                             "normal and low); default 0, all normal")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    if not 0 <= args.highs <= args.n:
        parser.error("--highs must be between 0 and -n")
    summary = run(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for event in summary["events"]:
            print(f"  {event}")
        for name in ("enqueued", "completed_unique", "lost", "duplicated", "dead_letters",
                     "dispatcher_starts", "exit_codes", "workdir"):
            print(f"{name:>18}: {summary[name]}")
    return 1 if summary["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
