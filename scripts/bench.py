#!/usr/bin/env python3
"""Benchmark redis-dispatcher against a server this script starts, and against raw Pool.

Every figure is the median of --runs runs, all in one invocation, so ratios compare like with
like on a noisy machine. Prints one table, or JSON with --json.

    python scripts/bench.py             # the README's table (a few minutes)
    python scripts/bench.py --quick     # smaller, for a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import redis  # noqa: E402

from bench_tasks import burn  # noqa: E402
from dispatcher import Call, Client  # noqa: E402
from dispatcher.server import start_server  # noqa: E402

PROCS = 2
PREFETCH = 64  # the --prefetch of the "prefetch" rows: tasks queued in the pool beyond idle children
# (the default --batch: one fetch can fill it all at start; it is refilled by halves)
QUEUES = ("dispatcher:high", "dispatcher:normal", "dispatcher:low")


class Dispatcher:
    """One `python -m dispatcher` process for one measurement."""

    def __init__(self, url: str, workdir: Path, *extra: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
        self.log = workdir / f"dispatcher-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--redis-url", url, "--procs", str(PROCS),
             "--tasks", "bench_tasks", "--log-level", "WARNING", *extra],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=str(workdir))

    def wait_idle(self, r: redis.Redis, timeout: float = 30, slots: int = PROCS) -> None:
        """Ready when registered with all tokens free and its workers have run a task."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text())
            ids = r.smembers("dispatcher:dispatchers")
            if ids and all(r.llen(f"dispatcher:dispatcher:{i.decode()}:tokens") == slots for i in ids):
                return
            time.sleep(0.01)
        raise RuntimeError("dispatcher not ready")

    def peak_rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return -1

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def reset(r: redis.Redis) -> None:
    """The bench owns its server: start each measurement from an empty database."""
    r.flushdb()


def warm(url: str, r: redis.Redis, d: Dispatcher) -> None:
    """Run a few tasks so every child has imported everything before timing starts."""
    with Client(url) as c:
        for h in c.enqueue_many([("bench.noop", ())] * (PROCS * 4)):
            h.result(timeout=30)


def drained(r: redis.Redis) -> bool:
    pipe = r.pipeline(transaction=False)
    for q in QUEUES:
        pipe.llen(q)
    ids = r.smembers("dispatcher:dispatchers")
    for i in ids:
        pipe.hlen(f"dispatcher:dispatcher:{i.decode()}:inflight")
    return not any(pipe.execute())


def bench_drain(url: str, r: redis.Redis, workdir: Path, n: int, *extra: str) -> dict:
    """N no-op tasks already queued; a dispatcher starts; time until the last one finished."""
    reset(r)
    elements = [b'{"task":"bench.noop"}'] * 1000
    for _ in range(n // 1000):
        r.lpush("dispatcher:normal", *elements)
    t_spawn = time.perf_counter()
    d = Dispatcher(url, workdir, *extra)
    samples = []  # (time, remaining)
    t_first = None
    while True:
        remaining = r.llen("dispatcher:normal")
        now = time.perf_counter()
        if t_first is None and remaining < n:
            t_first = now
        samples.append((now, remaining))
        if remaining == 0 and drained(r):
            break
        time.sleep(0.005)
    t_end = time.perf_counter()
    d.stop()
    steady = _steady_rate(samples, n)
    return {"drain_per_s": n / (t_end - t_first), "steady_per_s": steady,
            "with_startup_per_s": n / (t_end - t_spawn), "startup_s": t_first - t_spawn}


def _steady_rate(samples: list[tuple[float, int]], n: int) -> float:
    """Rate while the backlog went from 80% to 20% of n: no start-up, no tail."""
    t80 = next(t for t, left in samples if left <= 0.8 * n)
    t20 = next(t for t, left in samples if left <= 0.2 * n)
    return 0.6 * n / (t20 - t80) if t20 > t80 else float("nan")


def bench_enqueue(url: str, r: redis.Redis, n: int) -> dict:
    reset(r)
    with Client(url) as c:
        t0 = time.perf_counter()
        for _ in range(n // 10):
            c.enqueue("bench.noop")
        single = (n // 10) / (time.perf_counter() - t0)
        calls = [Call("bench.noop")] * 1000
        t0 = time.perf_counter()
        for _ in range(n // 1000):
            c.enqueue_many(calls, result=False)
        many = (n // 1000 * 1000) / (time.perf_counter() - t0)
    return {"enqueue_per_s": single, "enqueue_many_per_s": many}


def push_stamps(r: redis.Redis, queue: str, ids: list[str]) -> float:
    """Push bench.stamp tasks with these ids; returns the server's clock at the push itself
    (TIME in the LPUSH's MULTI), comparable with the children's time.time() on this machine."""
    pipe = r.pipeline(transaction=True)
    pipe.lpush(queue, *(json.dumps({"task": "bench.stamp", "id": i, "result": True}) for i in ids))
    pipe.time()
    seconds, micros = pipe.execute()[1]
    return seconds + micros / 1e6


def bench_latency(url: str, r: redis.Redis, workdir: Path, count: int, *extra: str) -> dict:
    """An idle dispatcher; tasks pushed 5 ms apart; push -> task start, in ms.

    "Push" is the server's clock at the LPUSH itself (push_stamps), as in bench_priority.
    The "call" figure counts from before the producer's call instead: it adds the producer's
    own encoding and round trip, which no dispatcher can make shorter.
    """
    reset(r)
    d = Dispatcher(url, workdir, *extra)
    d.wait_idle(r, slots=_slots(extra))
    pushes = []
    with Client(url) as c:
        warm(url, r, d)
        for i in range(count):
            task_id = f"latency-{i}-{time.monotonic_ns()}"
            called = time.time()
            pushes.append((called, push_stamps(r, "dispatcher:normal", [task_id]), task_id))
            time.sleep(0.005)
        starts = [c.handle(task_id).result(timeout=30) for _, _, task_id in pushes]
    d.stop()
    lat = sorted((start - pushed) * 1000 for (_, pushed, _), start in zip(pushes, starts))
    from_call = sorted((start - called) * 1000 for (called, _, _), start in zip(pushes, starts))
    pick = lambda values, q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return {"p50_ms": pick(lat, 0.5), "p90_ms": pick(lat, 0.9), "p99_ms": pick(lat, 0.99),
            "max_ms": lat[-1], "p50_from_call_ms": pick(from_call, 0.5)}


def calibrate_burn(target: float = 0.02) -> int:
    """Loops of bench.burn that take about `target` seconds here."""
    loops = 20_000
    while True:
        took = burn(loops)
        if took > 0.005:
            return int(loops * target / took)
        loops *= 4


def bench_cpu(url: str, r: redis.Redis, workdir: Path, count: int, loops: int, *extra: str) -> dict:
    """Parallel efficiency: the tasks' own CPU seconds / procs (the ideal wall) over the wall."""
    reset(r)
    d = Dispatcher(url, workdir, *extra)
    d.wait_idle(r, slots=_slots(extra))
    warm(url, r, d)
    with Client(url) as c:
        t0 = time.perf_counter()
        handles = c.enqueue_many([("bench.burn", (loops,))] * count)
        wall = _wait_all(c, handles) - t0
        work = sum(h.result(timeout=120) for h in handles)
    d.stop()
    ideal = work / PROCS
    return {"cpu_wall_s": wall, "cpu_ideal_s": ideal, "cpu_efficiency": ideal / wall,
            "cpu_task_ms": work / count * 1000}


def _wait_all(c: Client, handles: list) -> float:
    """When the last of these tasks had its outcome (perf_counter), found with a few wake-ups.

    Waiting on each handle in turn woke this process, and Redis, once per task: CPU taken from
    the very children being measured (about one point of efficiency on 2 cores). Tasks start in
    order, so the last one ends last or nearly: wait for it, then check all the others in one
    round trip, and wait for any still running. (One that ended during that round trip counts
    as ended before it: the round trip's length, about a millisecond.)"""
    handles[-1].result(timeout=120)  # raises if it did not end in time
    done = time.perf_counter()
    pipe = c.store.client.pipeline(transaction=False)
    for h in handles:
        pipe.exists(c.store.keys.result(h.id))
    for h, there in zip(handles, pipe.execute()):
        if not there:
            h.result(timeout=120)
            done = time.perf_counter()
    return done


def bench_priority(url: str, r: redis.Redis, workdir: Path, lows: int, highs: int, *extra: str) -> dict:
    """Lows queued; highs pushed mid-run; count lows that started while a high waited in Redis.

    "In Redis" is the server's clock at the push itself (TIME in the LPUSH's MULTI), on the same
    machine as the children's time.time() stamps.
    """
    reset(r)
    with Client(url) as c:
        low_handles = c.enqueue_many([("bench.stamp", ())] * lows, priority="low")
        d = Dispatcher(url, workdir, *extra)
        while r.llen("dispatcher:low") > lows // 2:
            time.sleep(0.001)
        ids = [f"high-{i}-{time.monotonic_ns()}" for i in range(highs)]
        high_in_redis = push_stamps(r, "dispatcher:high", ids)
        high_starts = [c.handle(i).result(timeout=60) for i in ids]
        low_starts = [h.result(timeout=120) for h in low_handles]
    d.stop()
    last_high = max(high_starts)
    overtaking = [s - high_in_redis for s in low_starts if high_in_redis < s < last_high]
    # How soon after the push they started: a low taken from Redis just before the push is
    # still on its way to a child for a fraction of a millisecond, and starts after it.
    return {"low_started_while_high_waited": len(overtaking),
            "overtakers_latest_start_ms": max(overtaking) * 1000 if overtaking else float("nan")}


def bench_rss(url: str, r: redis.Redis, workdir: Path, queued: int, seconds: float = 3.0) -> int:
    """Peak RSS (KiB) of a dispatcher serving for a while with `queued` tasks waiting."""
    reset(r)
    element = [b'{"task":"bench.noop"}'] * 10_000
    pipe = r.pipeline(transaction=False)
    for i in range(queued // 10_000 or 1):
        pipe.lpush("dispatcher:low", *(element if queued >= 10_000 else element[:queued]))
        if i % 10 == 9:
            pipe.execute()
    pipe.execute()
    d = Dispatcher(url, workdir)
    time.sleep(seconds)
    rss = d.peak_rss_kb()
    d.stop()
    return rss


def _slots(extra: tuple[str, ...]) -> int:
    return PROCS + (int(extra[extra.index("--prefetch") + 1]) if "--prefetch" in extra else 0)


def suffixed(figures: dict, suffix: str) -> dict:
    return {f"{k}_{suffix}": v for k, v in figures.items()}


def _pool_noop() -> None:
    return None


def _one_job_per_child(pool: multiprocessing.pool.Pool, fn, args: tuple, count: int) -> list:
    """Submit `count` jobs, never more than PROCS unfinished at once (the dispatcher's rule at
    --prefetch 0); returns their results once every one has finished."""
    free = threading.Semaphore(PROCS)
    release = lambda _: free.release()  # noqa: E731
    results = []
    for _ in range(count):
        free.acquire()
        results.append(pool.apply_async(fn, args, callback=release, error_callback=release))
    for _ in range(PROCS):
        free.acquire()  # the last jobs have finished
    return results


def bench_raw_pool(n: int) -> dict:
    """The ceiling: multiprocessing.Pool.apply_async no-ops, unbounded and one job per child."""
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(PROCS) as pool:
        pool.apply_async(_pool_noop).get()
        t0 = time.perf_counter()
        for res in [pool.apply_async(_pool_noop) for _ in range(n)]:
            res.get()
        unbounded = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        _one_job_per_child(pool, _pool_noop, (), n)
        bounded = n / (time.perf_counter() - t0)
    return {"raw_pool_per_s": unbounded, "raw_pool_one_per_child_per_s": bounded}


def bench_raw_pool_cpu(count: int, loops: int) -> dict:
    """The same CPU-bound tasks on a bare Pool: what this machine allows. Fed both ways: all
    queued at once (as a deep --prefetch would), and one job per child (as --prefetch 0)."""
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(PROCS) as pool:
        pool.apply_async(burn, (10,)).get()
        t0 = time.perf_counter()
        work = sum(res.get() for res in [pool.apply_async(burn, (loops,)) for _ in range(count)])
        unbounded = work / PROCS / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        results = _one_job_per_child(pool, burn, (loops,), count)
        bounded = sum(res.get() for res in results) / PROCS / (time.perf_counter() - t0)
    return {"raw_pool_cpu_efficiency": unbounded, "raw_pool_one_per_child_cpu_efficiency": bounded}


def median_of(runs: int, fn, *args) -> dict:
    """Each figure's median over the runs that have it (NaN: that run had nothing to measure)."""
    return _medians([fn(*args) for _ in range(runs)])


def priority_of(runs: int, *args) -> dict:
    """bench_priority's medians, and in how many runs any low task overtook: the target is none
    in every run, which a median of 0 does not show."""
    results = [bench_priority(*args) for _ in range(runs)]
    figures = _medians(results)
    figures["runs_with_overtakers"] = sum(r["low_started_while_high_waited"] > 0 for r in results)
    return figures


def _medians(results: list[dict]) -> dict:
    return {k: _median([r[k] for r in results if not math.isnan(r[k])]) for k in results[0]}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=_positive, default=3, help="runs per figure (median); default 3")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one run, no 1M RSS")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    n_drain = 5_000 if args.quick else 20_000
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    out: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                 "procs": PROCS, "prefetch": PREFETCH, "runs": runs}
    prefetch = ("--prefetch", str(PREFETCH))
    server, ok = None, False
    try:
        server = start_server(workdir / "redis", appendfsync="everysec")
        r = redis.Redis.from_url(server.url)
        out.update(median_of(runs, bench_raw_pool, n_drain))
        out.update(median_of(runs, bench_drain, server.url, r, workdir, n_drain))
        out["ratio_to_raw_pool"] = out["drain_per_s"] / out["raw_pool_per_s"]
        # --prefetch 0 feeds one job per child: the raw pool fed the same way is its ceiling
        out["ratio_to_raw_one_per_child"] = out["drain_per_s"] / out["raw_pool_one_per_child_per_s"]
        out.update(suffixed(median_of(runs, bench_drain, server.url, r, workdir, n_drain, *prefetch),
                            "prefetch"))
        out["ratio_to_raw_pool_prefetch"] = out["drain_per_s_prefetch"] / out["raw_pool_per_s"]
        out.update(median_of(runs, bench_enqueue, server.url, r, n_drain))
        latency_tasks = 100 if args.quick else 300
        out.update(median_of(runs, bench_latency, server.url, r, workdir, latency_tasks))
        out.update(suffixed(median_of(runs, bench_latency, server.url, r, workdir, latency_tasks, *prefetch),
                            "prefetch"))
        loops = calibrate_burn()
        cpu_tasks = 50 if args.quick else 200
        out.update(median_of(runs, bench_raw_pool_cpu, cpu_tasks, loops))
        out.update(median_of(runs, bench_cpu, server.url, r, workdir, cpu_tasks, loops))
        out.update(suffixed(median_of(runs, bench_cpu, server.url, r, workdir, cpu_tasks, loops,
                                      *prefetch), "prefetch"))
        lows = 500 if args.quick else 2000
        out.update(priority_of(runs, server.url, r, workdir, lows, 20))
        out.update(suffixed(priority_of(runs, server.url, r, workdir, lows, 20, *prefetch), "prefetch"))
        out["rss_kb_1k_queued"] = bench_rss(server.url, r, workdir, 1_000)
        if not args.quick:
            out["rss_kb_1m_queued"] = bench_rss(server.url, r, workdir, 1_000_000)
        ok = True
    finally:
        if server is not None:
            server.stop()
        if ok:  # the server's files and the dispatchers' logs: kept only to find out what failed
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench failed; the dispatchers' logs and the server's files are in {workdir}",
                  file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _overtakers(out: dict, suffix: str = "") -> str:
    latest_ms = out["overtakers_latest_start_ms" + suffix]
    if math.isnan(latest_ms):
        return "none in any run"
    return (f"{out['runs_with_overtakers' + suffix]} of {out['runs']} runs had some; the latest "
            f"started {latest_ms:.2f} ms after the push (median of those runs)")


def print_table(out: dict) -> None:
    rows = [
        ("machine", out["machine"], ""),
        ("raw Pool.apply_async no-op ceiling", f"{out['raw_pool_per_s']:,.0f} /s",
         f"one job per child: {out['raw_pool_one_per_child_per_s']:,.0f} /s"),
        (f"no-op drain, --procs {PROCS}", f"{out['drain_per_s']:,.0f} /s",
         f"steady {out['steady_per_s']:,.0f} /s; {out['ratio_to_raw_pool']:.2f} x raw pool, "
         f"{out['ratio_to_raw_one_per_child']:.2f} x raw one per child; "
         f"with process start-up {out['with_startup_per_s']:,.0f} /s"),
        (f"  the same, --prefetch {PREFETCH}", f"{out['drain_per_s_prefetch']:,.0f} /s",
         f"steady {out['steady_per_s_prefetch']:,.0f} /s; {out['ratio_to_raw_pool_prefetch']:.2f} x raw pool"),
        ("enqueue, single calls", f"{out['enqueue_per_s']:,.0f} /s", ""),
        ("enqueue_many (1000 per call)", f"{out['enqueue_many_per_s']:,.0f} /s", ""),
        ("latency push -> start, idle", f"p50 {out['p50_ms']:.2f} ms",
         f"p90 {out['p90_ms']:.2f}, p99 {out['p99_ms']:.2f}, max {out['max_ms']:.2f} ms; "
         f"p50 from before the producer's call {out['p50_from_call_ms']:.2f} ms"),
        (f"  the same, --prefetch {PREFETCH}", f"p50 {out['p50_ms_prefetch']:.2f} ms",
         f"p90 {out['p90_ms_prefetch']:.2f}, p99 {out['p99_ms_prefetch']:.2f}, max {out['max_ms_prefetch']:.2f} ms"),
        (f"CPU-bound {out['cpu_task_ms']:.0f} ms tasks", f"efficiency {out['cpu_efficiency']:.3f}",
         f"wall {out['cpu_wall_s']:.2f} s vs ideal {out['cpu_ideal_s']:.2f} s"),
        (f"  the same, --prefetch {PREFETCH}", f"efficiency {out['cpu_efficiency_prefetch']:.3f}",
         f"wall {out['cpu_wall_s_prefetch']:.2f} s"),
        ("  the same tasks on a bare Pool", f"efficiency {out['raw_pool_cpu_efficiency']:.3f}",
         f"one job per child: {out['raw_pool_one_per_child_cpu_efficiency']:.3f}"),
        ("priority: lows started while a high waited", str(out["low_started_while_high_waited"]),
         _overtakers(out)),
        (f"  the same, --prefetch {PREFETCH}", str(out["low_started_while_high_waited_prefetch"]),
         _overtakers(out, "_prefetch")),
        ("dispatcher peak RSS, 1k queued", f"{out['rss_kb_1k_queued'] / 1024:.1f} MB", ""),
    ]
    if "rss_kb_1m_queued" in out:
        rows.append(("dispatcher peak RSS, 1M queued", f"{out['rss_kb_1m_queued'] / 1024:.1f} MB",
                     f"difference {(out['rss_kb_1m_queued'] - out['rss_kb_1k_queued']) / 1024:+.1f} MB"))
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>18}  {note}")


if __name__ == "__main__":
    sys.exit(main())
