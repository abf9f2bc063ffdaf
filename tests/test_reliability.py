"""Nothing is lost: child death, time limits, retries, dispatcher death, Redis outages.

Real processes killed with real signals, real servers killed and restarted.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from dispatcher import Call, TaskFailed
from dispatcher.codec import decode
from procs import DispatcherProcess, pool_children, run_cli, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def start(start):
    """The shared starter, with quick retries so retry paths finish fast."""
    return lambda *flags: start("--retry-backoff", "0.05", "--retry-backoff-max", "0.2", *flags)


def _state(pid: int) -> str:
    """A process's state letter (Z: a zombie, which runs nothing); "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def pids_of(r, key):
    return [int(p) for p in r.lrange(key + ":pids", 0, -1)]


def test_a_child_killed_mid_task_is_noticed_and_the_task_retried(start, client, r, redis_url):
    proc = start("--procs", "2")
    handle = client.enqueue("t.hang_first", redis_url, "k1")
    [victim] = wait_for(lambda: pids_of(r, "k1"), 10, what="first attempt started")
    os.kill(victim, signal.SIGKILL)
    assert handle.result(timeout=20) == 2                       # ran again, and succeeded
    assert "WorkerLost" in proc.log and "will retry" in proc.log
    wait_for(lambda: len(pool_children(proc.proc.pid)) == 2 and victim not in pool_children(proc.proc.pid),
             10, what="pool back to 2 live children")
    assert client.enqueue("t.echo", 1).result(timeout=20)["args"] == [1]


@pytest.mark.parametrize("how", ["exit", "segfault", "sigkill"])
def test_a_child_that_dies_by_itself_is_retried(start, client, r, redis_url, how):
    proc = start("--procs", "1")
    assert client.enqueue("t.crash_first", redis_url, f"c-{how}", how).result(timeout=20) == 2
    assert "WorkerLost" in proc.log
    assert client.enqueue("t.echo", 2).result(timeout=20)["args"] == [2]


def test_hard_time_limit_from_payload_decorator_and_cli(start, client, r):
    proc = start("--procs", "2", "--time-limit", "0.5", "--kill-grace", "0.5")
    # the payload's limit, retried once, then dead with the limit as its error
    handle = client.enqueue_call(Call("t.span", (30,)), time_limit=0.3, max_retries=1)
    with pytest.raises(TaskFailed) as failed:
        handle.result(timeout=30)
    assert failed.value.error_type == "TimeLimitExceeded"
    with pytest.raises(TaskFailed, match="TimeLimitExceeded"):   # the decorator's limit (0.5 s, no retries)
        client.enqueue("t.limited", 30).result(timeout=30)
    with pytest.raises(TaskFailed, match="TimeLimitExceeded"):   # the CLI's limit
        client.enqueue_call(Call("t.span", (30,)), max_retries=0).result(timeout=30)
    assert client.enqueue("t.span", 0.05).result(timeout=10)     # under the limit: fine
    [letter] = [d for d in json.loads(run_cli("dead", "list", "--json", url=_url(r), check=True).stdout)
                if d.get("task_id") == handle.id]
    assert letter["attempts"] == "2" and letter["error"] == "TimeLimitExceeded"
    wait_for(lambda: len(pool_children(proc.proc.pid)) == 2, 10, what="pool back to 2 children")


def test_soft_time_limit_raises_inside_the_task(start, client):
    start("--procs", "1")
    assert client.enqueue_call(Call("t.soft", (5,)), soft_time_limit=0.2).result(timeout=20) == "cleaned up"


def test_retries_with_backoff_then_success(start, client, r, redis_url):
    start("--procs", "2")
    assert client.enqueue("t.flaky", redis_url, "f1", 2).result(timeout=20) == 3


def test_retries_spent_go_to_dead_letters_with_everything_needed(start, client, r, redis_url):
    start("--procs", "2", "--max-retries", "2")
    handle = client.enqueue("t.flaky", redis_url, "f2", 99)
    with pytest.raises(TaskFailed, match="flaky failure 3"):
        handle.result(timeout=20)
    [letter] = json.loads(run_cli("dead", "list", "--json", url=redis_url, check=True).stdout)
    assert letter["attempts"] == "3" and letter["error"] == "ConnectionError"
    assert "flaky failure 3" in letter["traceback"] and letter["dead_at"] and letter["enqueued_at"]
    assert letter["queue"] == "dispatcher:normal" and letter["task"] == "t.flaky"
    out = json.loads(run_cli("dead", "requeue", letter["id"], "--json", url=redis_url, check=True).stdout)
    assert out == {"requeued": [letter["id"]], "not_found": []}
    wait_for(lambda: r.llen("dispatcher:dead") == 1, 20, what="requeued task to fail its retries again")
    assert int(r.get("f2")) == 6                                 # requeue gave it a fresh set of retries


def test_countdown_waits_in_the_schedule_then_runs(start, client, r):
    start("--procs", "1")
    handle = client.enqueue("t.echo", "later", countdown=1.0)
    assert r.zcard("dispatcher:schedule:normal") == 1 and r.llen("dispatcher:normal") == 0
    assert handle.outcome(timeout=0.3) is None
    assert handle.result(timeout=10)["args"] == ["later"]
    assert r.zcard("dispatcher:schedule:normal") == 0


def test_sigkilled_dispatcher_gives_its_tasks_back_when_it_restarts(start, client, r, redis_url):
    proc = start("--procs", "2", "--name", "d-restart")
    handles = [client.enqueue("t.counted_sleep", redis_url, f"s{i}", 1.5) for i in range(2)]
    waiting = client.enqueue("t.echo", "queued")
    wait_for(lambda: all(r.get(f"s{i}") for i in range(2)), 10, what="both running")
    proc.kill()
    assert r.hlen("dispatcher:dispatcher:d-restart:inflight") == 4   # still recorded in Redis
    start("--procs", "2", "--name", "d-restart")
    assert sorted(h.result(timeout=30) for h in handles) == [2, 2]    # each ran again, once
    assert waiting.result(timeout=10)["args"] == ["queued"]


def test_the_children_of_a_sigkilled_dispatcher_die_with_it(start, client, r):
    """Left alone they would run their task on, past any time limit, beside the restart's run."""
    proc = start("--procs", "2")
    client.enqueue("t.span", 600)
    wait_for(lambda: r.hlen(f"dispatcher:dispatcher:{r.smembers('dispatcher:dispatchers').pop().decode()}"
                            ":inflight") == 2, 10, what="the task taken")
    children = wait_for(lambda: pool_children(proc.proc.pid), 10, what="the children")
    proc.kill()
    wait_for(lambda: all(_state(c) in ("", "Z") for c in children), 10, what="the children gone")


def test_prefetched_tasks_of_a_sigkilled_dispatcher_come_back_exactly_once(start, client, r, redis_url):
    proc = start("--procs", "1", "--prefetch", "3", "--name", "d-prefetch")
    handles = [client.enqueue("t.counted_sleep", redis_url, f"p{i}", 1.0) for i in range(4)]
    wait_for(lambda: r.hlen("dispatcher:dispatcher:d-prefetch:inflight") == 8, 10, what="all four taken")
    wait_for(lambda: any(r.get(f"p{i}") for i in range(4)), 10, what="one running")
    proc.kill()
    start("--procs", "2", "--name", "d-prefetch")
    assert sorted(h.result(timeout=30) for h in handles) == [1, 1, 1, 2]  # only the running one ran twice


def test_a_live_dispatcher_recovers_a_dead_peer_after_its_heartbeat_expires(start, client, r, redis_url):
    victim = start("--procs", "1", "--heartbeat-ttl", "1", "--name", "victim")
    handle = client.enqueue("t.counted_sleep", redis_url, "peer", 0.5)
    wait_for(lambda: r.get("peer"), 10, what="task running on the victim")
    victim.kill()
    proc = start("--procs", "1", "--heartbeat-ttl", "1", "--name", "rescuer")
    assert handle.result(timeout=30) == 2
    assert "dispatcher victim stopped beating: put 1 of its tasks back" in proc.log
    assert "victim" not in [m.decode() for m in r.smembers("dispatcher:dispatchers")]


def test_a_dispatcher_paused_past_its_ttl_whose_id_was_taken_stops_and_touches_nothing(start, client, r, redis_url):
    """Paused (or cut off from Redis) past its heartbeat's TTL, a dispatcher's id was claimed by
    a new one on the same host; resumed, both wrote the same records, each putting back the
    other's tasks. Now the first stops at its next write, and says why."""
    first = start("--procs", "1", "--heartbeat-ttl", "1")
    [dispatcher_id] = [m.decode() for m in r.smembers("dispatcher:dispatchers")]
    first.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not r.exists(f"dispatcher:dispatcher:{dispatcher_id}"), 10, what="the heartbeat lapsed")
        second = start("--procs", "1", "--heartbeat-ttl", "1")
        assert json.loads(r.get(f"dispatcher:dispatcher:{dispatcher_id}"))["pid"] == second.proc.pid
    finally:
        first.signal(signal.SIGCONT)
    assert first.wait(timeout=20) == 1
    assert f"dispatcher id {dispatcher_id} is now held by another process" in first.log
    assert json.loads(r.get(f"dispatcher:dispatcher:{dispatcher_id}"))["pid"] == second.proc.pid
    assert client.enqueue("t.echo", 1).result(timeout=20)["args"] == [1]
    assert second.proc.poll() is None and "reconciling" not in second.log


def test_a_dispatcher_that_finds_its_heartbeat_gone_takes_it_back_before_it_fetches(start, client, r):
    proc = start("--procs", "1")
    [dispatcher_id] = [m.decode() for m in r.smembers("dispatcher:dispatchers")]
    r.delete(f"dispatcher:dispatcher:{dispatcher_id}")             # as after a long outage
    assert client.enqueue("t.echo", 1).result(timeout=20)["args"] == [1]
    assert f"heartbeat of {dispatcher_id} had lapsed" in proc.log
    assert json.loads(r.get(f"dispatcher:dispatcher:{dispatcher_id}"))["pid"] == proc.proc.pid


def test_a_task_longer_than_three_heartbeat_ttls_runs_exactly_once(start, client, r, redis_url):
    for name in ("a", "b"):
        start("--procs", "1", "--heartbeat-ttl", "1", "--name", name)
    handle = client.enqueue("t.counted_sleep", redis_url, "long", 3.5)
    assert handle.result(timeout=30) == 1
    assert int(r.get("long")) == 1


def test_redis_outage_is_survived_and_outcomes_are_written_afterwards(start, client, r, redis_server, redis_url):
    proc = start("--procs", "2")
    handles = [client.enqueue("t.span", 2.0, str(i)) for i in range(2)]
    queued = client.enqueue("t.echo", "after")
    wait_for(lambda: r.llen("dispatcher:normal") == 1, 10, what="two running")
    time.sleep(1.1)                                              # past one AOF fsync
    redis_server.kill()
    time.sleep(10)                                               # the tasks finish while Redis is down
    redis_server.restart()
    assert [h.result(timeout=30)["tag"] for h in handles] == ["0", "1"]
    assert queued.result(timeout=30)["args"] == ["after"]
    assert "Redis unreachable" in proc.log and "Redis is back" in proc.log
    [did] = [m.decode() for m in r.smembers("dispatcher:dispatchers")]
    wait_for(lambda: r.llen(f"dispatcher:dispatcher:{did}:tokens") == 2, 10, what="no token stuck")
    assert proc.proc.poll() is None


def test_an_idle_dispatcher_notices_a_redis_restart_and_serves_the_next_push(start, client, r, redis_server):
    proc = start("--procs", "1")
    assert client.enqueue("t.echo", "before").result(timeout=20)["args"] == ["before"]
    blocked = lambda: sum(c["cmd"] == "blmove" and "b" in c["flags"] for c in r.client_list()) == 4  # noqa: E731
    wait_for(blocked, 10, what="the loop to sleep on its waiters (3 lists and the wake list)")
    redis_server.kill()
    wait_for(lambda: "outcome(s) kept in memory" in proc.log, 10, what="the idle loop to notice the outage")
    redis_server.restart()
    # A bound far below the loop's 30 s safety-net sleep: the waiters were re-armed, not lost.
    assert client.enqueue("t.echo", "after").result(timeout=10)["args"] == ["after"]
    assert proc.proc.poll() is None


def _url(r):
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/0"


def test_a_dispatcher_started_while_redis_is_down_waits_for_it(redis_server, redis_url, tmp_path, client):
    redis_server.kill()
    proc = DispatcherProcess(redis_url, tmp_path / "early.log", "--procs", "1", "--tasks", "e2e_tasks")
    try:
        wait_for(lambda: "Redis unreachable" in proc.log, 20, what="the outage to be logged")
        assert proc.proc.poll() is None
        redis_server.restart()
        proc.wait_ready()
        assert client.enqueue("t.echo", "up").result(timeout=20)["args"] == ["up"]
    finally:
        proc.close()


def test_a_batch_lost_during_shutdown_puts_its_unstarted_tasks_back_uncounted(start, client, r):
    """A child dies mid-batch while the dispatcher is stopping: the task it ran fails, the tasks
    of its batch that never started go back to Redis with no attempt counted."""
    # A budget of 10 s: the warm-up run counts as quick even on a machine busy enough to make
    # it take milliseconds, so the 16 tasks are batched for sure.
    proc = start("--procs", "1", "--prefetch", "15", "--batch-budget", "10", "--log-level", "DEBUG")
    assert client.enqueue("t.quick", 0).result(timeout=20) == 0     # now known to be quick
    calls = [Call("t.quick", (i,)) for i in range(16)]
    calls[2] = Call("t.quick", (2, None, 60))                       # hangs, this once
    handles = client.enqueue_many(calls)
    assert handles[1].result(timeout=20) == 1                       # so task 2 is running
    assert "batch of 8" in proc.log
    proc.signal(signal.SIGTERM)
    wait_for(lambda: "stop requested" in proc.log, 10, what="the dispatcher to start stopping")
    [child] = pool_children(proc.proc.pid)
    os.kill(child, signal.SIGKILL)
    assert proc.wait(30) == 0
    with pytest.raises(TaskFailed, match="WorkerLost"):
        handles[2].result(timeout=5)
    assert sorted(decode(raw, max_size=1 << 20).args[0] for raw in r.lrange("dispatcher:normal", 0, -1)) == [3, 4, 5, 6, 7]
    assert [h.result(timeout=20) for h in handles[8:]] == list(range(8, 16))
    assert "11 completed, 1 failed, 0 retried, 1 dead-lettered, 5 put back" in proc.log
