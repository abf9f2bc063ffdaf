"""The whole product through the real CLI process against a real server the test started."""
from __future__ import annotations

import json
import signal
import time

import pytest

from dispatcher import Call, TaskFailed
from procs import run_cli, wait_for

pytestmark = pytest.mark.timeout(90)


def tokens_free(r, prefix="dispatcher"):
    ids = [i.decode() for i in r.smembers(f"{prefix}:dispatchers")]
    return sum(r.llen(f"{prefix}:dispatcher:{i}:tokens") for i in ids)


def test_start_log_names_url_queues_tasks_and_pool(start, redis_url):
    proc = start("--procs", "3")
    log = proc.log
    assert redis_url.split("/")[2] in log
    assert "dispatcher:high, dispatcher:normal, dispatcher:low" in log
    assert "t.echo" in log and "t.span" in log
    assert "pool: 3 worker process(es)" in log


def test_example_tasks_are_served_without_tasks_flag(start, client):
    proc = start("--procs", "1", tasks=())
    assert "no --tasks given: serving the example tasks" in proc.log
    assert client.enqueue("example.square", 9, priority="high").result(timeout=20) == 81


def test_results_from_all_three_producers(start, client, r, redis_url):
    start("--procs", "2")
    # 1. redis-cli style: a JSON element, reply kept under the result key and sent to reply_to
    r.lpush("dispatcher:high", '{"task": "t.echo", "args": [1, "a"], "kwargs": {"k": 2}, '
                               '"id": "j1", "result": true, "reply_to": "my:replies"}')
    assert client.handle("j1").result(timeout=20) == {"args": [1, "a"], "kwargs": {"k": 2}}
    raw = r.lrange("dispatcher:result:j1", 0, -1)[0]
    assert json.loads(raw)["status"] == "ok"                       # replies in the codec the task came in
    assert 0 < r.ttl("dispatcher:result:j1") <= 24 * 3600
    assert json.loads(r.brpop("my:replies", 10)[1])["result"]["kwargs"] == {"k": 2}
    # 2. the Python helper, one and many
    assert client.enqueue("t.echo", 3, priority="low", k="v").result(timeout=20) == {"args": [3], "kwargs": {"k": "v"}}
    handles = client.enqueue_many([("t.echo", (i,)) for i in range(20)] + [Call("t.echo", (), {"x": 1})])
    assert [h.result(timeout=20)["args"] for h in handles[:20]] == [[i] for i in range(20)]
    # 3. the CLI, for machines without redis-cli
    out = run_cli("enqueue", "t.echo", "[5]", "--priority", "high", "--wait", url=redis_url, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == {"args": [5], "kwargs": {}}


def test_a_failing_task_reports_the_remote_traceback_and_the_dispatcher_goes_on(start, client, r):
    proc = start("--procs", "1", "--retry-backoff", "0.01")
    with pytest.raises(TaskFailed) as failed:
        client.enqueue("t.fail", "boom").result(timeout=20)
    assert failed.value.error_type == "ValueError" and "boom" in failed.value.message
    assert "e2e_tasks.py" in failed.value.traceback and "raise ValueError" in failed.value.traceback
    with pytest.raises(TaskFailed, match="ResultNotSerializable"):
        client.enqueue("t.unserializable").result(timeout=20)
    assert client.enqueue("t.echo", 1).result(timeout=20)["args"] == [1]
    assert proc.proc.poll() is None
    assert r.llen("dispatcher:dead") == 2                          # no retries left: dead letters


def test_bad_input_is_parked_unchanged_with_a_reason(start, client, r, redis_url):
    proc = start("--procs", "2", "--max-size", "1000")
    bad = [b"not json", b"[1,2]", b'{"args": []}', b'{"task": "no.such.task"}',
           b'{"task": "t.span", "args": "x"}', b'{"task": "t.span", "args": [1, 2, 3, 4]}',
           b'{"task": "t.echo", "args": ["' + b"x" * 2000 + b'"]}', b"\x93\x01\x02\x03",
           b'{"task": "t.echo", "time_limit": 1' + b"0" * 400 + b'}']
    for element in bad:
        r.lpush("dispatcher:normal", element)
    wait_for(lambda: r.llen("dispatcher:dead") == len(bad), 20, what="dead letters")
    assert client.enqueue("t.echo", 1).result(timeout=20)["args"] == [1]
    wait_for(lambda: tokens_free(r) == 2, 10, what="all tokens back")
    listed = json.loads(run_cli("dead", "list", "--json", url=redis_url, check=True).stdout)
    by_payload = {d.get("payload", d.get("payload_base64")): d for d in listed}
    assert by_payload["not json"]["queue"] == "dispatcher:normal"
    assert "unknown task 'no.such.task'" in by_payload['{"task": "no.such.task"}']["reason"]
    assert "args do not fit" in by_payload['{"task": "t.span", "args": [1, 2, 3, 4]}']["reason"]
    assert all(d["reason"] and d["dead_at"] for d in listed)
    assert proc.log.count("WARNING") >= len(bad)
    assert "dead letters: %d" % len(bad) in run_cli("status", url=redis_url, check=True).stdout
    run_cli("dead", "requeue", listed[0]["id"], url=redis_url, check=True)   # fails again: parked again
    wait_for(lambda: r.llen("dispatcher:dead") == len(bad), 20, what="requeued letter parked again")
    assert json.loads(run_cli("dead", "purge", "--json", url=redis_url, check=True).stdout) == {"purged": len(bad)}
    assert r.llen("dispatcher:dead") == 0


def test_a_reply_to_key_of_another_type_costs_only_the_reply_not_the_outcome(start, client, r):
    """A producer's reply_to that holds a string: the outcome is kept under the result key, a
    warning names the key, and the dispatcher goes on at once (no loop error, no pause)."""
    proc = start("--procs", "1")
    r.set("my:replies", "not a list")
    r.lpush("dispatcher:normal", '{"task": "t.echo", "args": [7], "id": "r1", "reply_to": "my:replies"}')
    assert client.handle("r1").result(timeout=20)["args"] == [7]
    assert client.enqueue("t.echo", 8).result(timeout=20)["args"] == [8]
    wait_for(lambda: "could not send an outcome to reply_to 'my:replies'" in proc.log, 10, what="the warning")
    assert "dispatcher:result:r1" in proc.log
    assert "loop error" not in proc.log                            # which pauses the loop for 2 s
    assert r.get("my:replies") == b"not a list" and r.llen("dispatcher:dead") == 0


def test_a_reply_to_naming_a_queue_or_the_dead_letters_is_refused(start, client, r):
    """The reply's EXPIRE would have put a TTL on the list: a busy queue, or the dead letters,
    gone a day later (or at --result-ttl)."""
    start("--procs", "1")
    client.enqueue("t.span", 0, priority="low")  # the low list exists, then is empty
    for key in ("dispatcher:low", "dispatcher:dead", "dispatcher:dispatchers"):
        r.lpush("dispatcher:normal", json.dumps({"task": "t.echo", "reply_to": key}))
    wait_for(lambda: r.llen("dispatcher:dead") == 3, 20, what="three dead letters")
    reasons = [r.hget(f"dispatcher:dead:{i.decode()}", "reason").decode() for i in r.lrange("dispatcher:dead", 0, -1)]
    assert all("'reply_to' names one of the dispatcher's own keys" in why for why in reasons)
    assert r.ttl("dispatcher:dead") == -1 and r.llen("dispatcher:low") == 0


def test_a_key_of_another_type_stops_fetching_loses_nothing_and_is_named(start, client, r, redis_url):
    """A fetch that popped the high list then failed on a normal list made a string by hand
    lost the high tasks. Now what comes before the broken list still runs; nothing after it
    is taken until it is mended."""
    proc = start("--procs", "1")
    r.set("dispatcher:normal", "oops")
    assert client.enqueue("t.echo", 1, priority="high").result(timeout=20)["args"] == [1]
    low = client.enqueue("t.echo", 2, priority="low")
    wait_for(lambda: "cannot go on: dispatcher:normal holds a string, not a list" in proc.log, 10,
             what="the error naming the key")
    assert r.llen("dispatcher:low") == 1                           # not taken, so not lost
    status = run_cli("status", "--in-flight", url=redis_url)            # when a person looks
    assert status.returncode == 0 and "BROKEN: dispatcher:normal holds a string" in status.stdout
    r.delete("dispatcher:normal")
    assert low.result(timeout=20)["args"] == [2]
    assert "going on: the key is mended" in proc.log and "loop error" not in proc.log


def test_an_outcome_that_cannot_be_written_is_parked_and_the_loop_goes_on(start, client, r):
    """A task whose argument is not valid Unicode (a lone surrogate, from a JSON escape) fails:
    its dead letter's payload cannot be encoded again. Parked as it came, with the reason; a
    warning, not an error with a traceback: the producer's data, not a bug."""
    proc = start("--procs", "1")
    element = b'{"task": "t.fail", "args": ["x\\ud800"]}'
    r.lpush("dispatcher:normal", element)
    assert client.enqueue("t.echo", 2).result(timeout=20)["args"] == [2]
    wait_for(lambda: r.llen("dispatcher:dead") == 1, 10, what="the dead letter")
    [dead_id] = r.lrange("dispatcher:dead", 0, -1)
    letter = r.hgetall(b"dispatcher:dead:" + dead_id)
    assert b"outcome could not be recorded" in letter[b"reason"] and letter[b"payload"] == element
    assert "loop error" not in proc.log and "ERROR" not in proc.log


def test_whoever_waits_on_a_task_that_cannot_run_gets_the_reason_at_once(start, client, r, redis_url):
    """Parked as a dead letter, it used to leave its waiter to the end of the timeout, told
    only that the task "may still be queued, running or waiting for a retry"."""
    start("--procs", "1")
    with pytest.raises(TaskFailed) as failed:
        client.enqueue("no.such.task", 1).result(timeout=10)
    assert failed.value.error_type == "UnknownTask" and "unknown task 'no.such.task'" in failed.value.message
    with pytest.raises(TaskFailed, match="InvalidTask"):
        client.enqueue("t.span", 1, 2, 3, 4).result(timeout=10)
    out = run_cli("enqueue", "no.such.task", "[1]", "--wait", "--timeout", "10", url=redis_url)
    assert out.returncode == 1 and "UnknownTask" in out.stderr
    r.lpush("dispatcher:normal", json.dumps({"task": "t.echo", "id": "own", "result": True, "reply_to": "dispatcher:low"}))
    with pytest.raises(TaskFailed, match="own keys"):
        client.handle("own").result(timeout=10)
    assert r.llen("dispatcher:low") == 0 and r.llen("dispatcher:dead") == 4
    letter = next(r.hgetall(f"dispatcher:dead:{i.decode()}") for i in r.lrange("dispatcher:dead", 0, -1)
                  if r.hget(f"dispatcher:dead:{i.decode()}", "task_id") == b"own")
    assert letter[b"task"] == b"t.echo" and b"own keys" in letter[b"reason"]


def test_strict_priority_and_fifo(start, client, r, redis_url):
    for priority in ("low", "normal", "high"):
        for i in range(3):
            client.enqueue("t.record", redis_url, "order", f"{priority[0]}{i}", priority=priority)
    start("--procs", "1")
    wait_for(lambda: r.llen("order") == 9, 30, what="nine tasks")
    assert [v.decode() for v in r.lrange("order", 0, -1)] == ["h0", "h1", "h2", "n0", "n1", "n2", "l0", "l1", "l2"]


def test_never_more_tasks_taken_than_free_workers(start, client, r):
    start("--procs", "2")
    handles = [client.enqueue("t.span", 0.3, str(i)) for i in range(6)]
    wait_for(lambda: r.hlen("dispatcher:dispatcher:%s:inflight" % r.smembers("dispatcher:dispatchers").pop().decode()) == 4,
             10, what="two tasks in flight")
    assert r.llen("dispatcher:normal") == 4                        # the rest stays in Redis
    spans = [h.result(timeout=30) for h in handles]
    events = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    running, most = 0, 0
    for _, delta in events:
        running += delta
        most = max(most, running)
    assert most <= 2 and len({s["pid"] for s in spans}) <= 2 + 0


def test_prefetch_takes_that_many_more_but_each_child_still_runs_one_at_a_time(start, client, r):
    start("--procs", "2", "--prefetch", "2")
    handles = [client.enqueue("t.span", 0.3, str(i)) for i in range(8)]
    did = lambda: r.smembers("dispatcher:dispatchers").pop().decode()  # noqa: E731
    wait_for(lambda: r.hlen(f"dispatcher:dispatcher:{did()}:inflight") == 8, 10, what="four tasks taken")
    assert r.llen("dispatcher:normal") == 4                        # two per child + two prefetched
    spans = [h.result(timeout=30) for h in handles]
    for pid in {s["pid"] for s in spans}:                          # no child ever ran two at once
        mine = sorted((s["start"], s["end"]) for s in spans if s["pid"] == pid)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(mine, mine[1:]))
    assert len({s["pid"] for s in spans}) <= 2


def test_a_deep_prefetch_is_refilled_by_halves(start, client, r):
    proc = start("--procs", "1", "--prefetch", "4")               # 5 slots; refilled at 2 free
    handles = [client.enqueue("t.span", 0.4, str(i)) for i in range(10)]
    wait_for(lambda: r.llen("dispatcher:normal") == 5, 10, what="five taken")
    handles[0].result(timeout=10)                                  # one slot free: no fetch for it
    assert r.llen("dispatcher:normal") == 5
    handles[1].result(timeout=10)                                  # two free: both filled at once
    wait_for(lambda: r.llen("dispatcher:normal") == 3, 10, what="two more taken")
    assert [h.result(timeout=30)["tag"] for h in handles] == [str(i) for i in range(10)]
    assert " ERROR " not in proc.log and " WARNING " not in proc.log


@pytest.mark.parametrize("start_method", ["forkserver", "spawn", "fork"])
def test_a_high_task_passes_the_prefetched_ones(start, client, r, start_method):
    """With --prefetch, the tasks waiting in the pool's queue are handed back unrun when a high
    task is pushed: it starts as soon as the child is free, and they run after it. (Each child
    gets its look at the high list through the pool's initializer: by pickle, or by fork.)"""
    proc = start("--procs", "1", "--prefetch", "4",               # 1 running, 4 waiting in the pool
                 "--start-method", start_method)
    lows = [client.enqueue("t.span", 0.4, f"low{i}", priority="low") for i in range(7)]
    wait_for(lambda: r.llen("dispatcher:low") == 2, 10, what="five taken")
    pushed = time.time()
    high = client.enqueue("t.span", 0.05, "high", priority="high").result(timeout=10)
    spans = [h.result(timeout=30) for h in lows]
    assert [s["tag"] for s in spans if pushed < s["start"] < high["start"]] == []
    assert high["start"] - pushed < 0.4 + 0.3                     # only the running one went first
    assert min(spans, key=lambda s: s["start"])["tag"] == "low0"   # already running at the push
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "8 completed, 0 failed, 0 retried, 0 dead-lettered, 0 put back" in proc.log
    assert "0 handed back for high tasks" not in proc.log          # the waiting ones were
    assert " ERROR " not in proc.log and " WARNING " not in proc.log


def test_quick_tasks_go_in_batches_and_a_lost_child_fails_only_its_running_task(start, client, r):
    """With --prefetch, names seen to run for microseconds are sent to a child several at a
    time (but high ones); a child that dies mid-batch loses only the task it was running."""
    # A budget of 10 s: the warm-up run counts as quick even on a machine busy enough to make
    # it take milliseconds, so the 16 tasks are batched for sure.
    proc = start("--procs", "1", "--prefetch", "15", "--batch-budget", "10", "--log-level", "DEBUG")
    assert client.enqueue("t.quick", 0).result(timeout=20) == 0    # now known to be quick
    calls = [Call("t.quick", (i,)) for i in range(16)]
    calls[5] = Call("t.quick", (5, 3))                             # os._exit(3) in the child
    handles = client.enqueue_many(calls)
    with pytest.raises(TaskFailed) as lost:
        handles[5].result(timeout=30)
    assert lost.value.error_type == "WorkerLost" and "exit code 3" in lost.value.message
    assert [h.result(timeout=30) for i, h in enumerate(handles) if i != 5] == [i for i in range(16) if i != 5]
    assert "batch of 8" in proc.log
    batches = proc.log.count("batch of")
    highs = client.enqueue_many([Call("t.quick", (i,)) for i in range(16)], priority="high")
    assert [h.result(timeout=30) for h in highs] == list(range(16))
    assert proc.log.count("batch of") == batches                   # a high task always goes alone
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "32 completed, 1 failed, 0 retried, 1 dead-lettered, 0 put back" in proc.log


def test_no_task_is_taken_before_the_children_can_run_it(start, client, r):
    handle = client.enqueue("t.never")
    proc = start("--procs", "1", tasks=("child_breaks",), ready=False)
    wait_for(lambda: proc.log.count("exited with exit code") >= 3, 30, what="children failing to start")
    assert " ready: " not in proc.log
    assert r.llen("dispatcher:normal") == 1 and tokens_free(r) == 1   # not taken, not held
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert r.llen("dispatcher:normal") == 1 and handle.outcome() is None


def test_sigterm_lets_running_tasks_finish_and_exits_zero_with_a_summary(start, client, r):
    proc = start("--procs", "2")
    running = [client.enqueue("t.span", 1.0, str(i)) for i in range(2)]
    wait_for(lambda: r.llen("dispatcher:normal") == 0, 10, what="both taken")
    queued = client.enqueue("t.echo", "later")
    proc.signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert [h.result(timeout=1)["tag"] for h in running] == ["0", "1"]
    assert r.llen("dispatcher:normal") == 1                        # not started, still queued
    assert "2 completed, 0 failed, 0 retried, 0 dead-lettered, 0 put back" in proc.log
    assert r.scard("dispatcher:dispatchers") == 0
    start("--procs", "1")                                          # a restart finds it as it was
    assert queued.result(timeout=20)["args"] == ["later"]


def test_grace_deadline_puts_unfinished_tasks_back_at_the_head(start, client, r):
    proc = start("--procs", "2", "--grace", "0.5")
    for i in range(2):
        client.enqueue("t.span", 60, f"long{i}")
    wait_for(lambda: r.llen("dispatcher:normal") == 0, 10, what="both taken")
    client.enqueue("t.echo", "newer")
    t0 = time.monotonic()
    proc.signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert time.monotonic() - t0 < 20
    assert "0 completed" in proc.log and "2 put back" in proc.log
    queue = r.lrange("dispatcher:normal", 0, -1)                   # right end = head: runs first
    assert len(queue) == 3 and b"newer" in queue[0]


def test_a_second_signal_skips_the_wait(start, client, r):
    proc = start("--procs", "1", "--grace", "60")
    client.enqueue("t.span", 60)
    wait_for(lambda: r.llen("dispatcher:normal") == 0, 10, what="taken")
    proc.signal(signal.SIGTERM)
    wait_for(lambda: "stop requested" in proc.log, 10, what="first signal seen")
    proc.signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "1 put back" in proc.log and r.llen("dispatcher:normal") == 1


def test_status_json(start, client, r, redis_url):
    start("--procs", "2")
    client.enqueue("t.span", 2)
    client.enqueue("t.echo", 1, priority="low")
    for _ in range(3):
        r.lpush("dispatcher:high", "junk")
    status = wait_for(lambda: (lambda s: s if s["dead"] == 3 and s["queues"]["normal"] == 0 else None)(
        json.loads(run_cli("status", "--json", url=redis_url, check=True).stdout)), 20, what="status")
    [(did, d)] = status["dispatchers"].items()
    assert d["alive"] and d["info"]["procs"] == 2
    assert d["in_flight"] + d["free_tokens"] == 2
    text = run_cli("status", url=redis_url, check=True).stdout
    assert "high" in text and f"dispatcher {did}: alive" in text


def test_status_lists_the_tasks_in_flight(start, client, r, redis_url):
    """Which task is it that hangs? The id a person can look for in their own logs."""
    start("--procs", "2")
    handle = client.enqueue("t.span", 4)
    wait_for(lambda: r.hlen(f"dispatcher:dispatcher:{r.smembers('dispatcher:dispatchers').pop().decode()}"
                            ":inflight") == 2, 10, what="the task taken")
    status = json.loads(run_cli("status", "--json", "--in-flight", url=redis_url, check=True).stdout)
    [d] = status["dispatchers"].values()
    assert d["tasks"] == [{"slot": d["tasks"][0]["slot"], "queue": "dispatcher:normal", "task": "t.span",
                           "id": handle.id}]
    text = run_cli("status", "--in-flight", url=redis_url, check=True).stdout
    assert f": t.span {handle.id} (from dispatcher:normal)" in text


def test_help_documents_every_flag():
    out = run_cli("--help", check=True).stdout
    for flag in ("--procs", "--tasks", "--redis-url", "--prefix", "--grace", "--result-ttl", "--max-size",
                 "--time-limit", "--soft-time-limit", "--max-retries", "--heartbeat-ttl", "--state-dir",
                 "--batch", "--name", "enqueue", "status", "dead"):
        assert flag in out
    assert "REDIS_URL" in out
