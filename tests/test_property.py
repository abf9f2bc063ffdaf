"""Untrusted input, end to end: whatever is pushed, the dispatcher stays up and loses nothing."""
from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from procs import DispatcherProcess, wait_for

PROCS = 2
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=10)
# Maps that look like tasks: sometimes valid, mostly subtly wrong. Each carries its own id and asks
# for a result, so a valid one is observable as a result and an invalid one as a dead letter.
task_maps = st.fixed_dictionaries(
    {"task": st.sampled_from(["t.echo", "t.fail", "no.such"]) | values},
    optional={"args": st.lists(values, max_size=3) | values, "kwargs": st.dictionaries(st.text(max_size=5), values, max_size=2) | values,
              "max_retries": st.just(0) | values, "extra": values})
elements = st.one_of(
    st.binary(max_size=64).map(lambda b: ("raw", b)),
    task_maps.map(lambda m: ("json", m)),
    task_maps.map(lambda m: ("msgpack", m)),
)


@pytest.fixture(scope="module")
def live(tmp_path_factory, request):
    server = request.getfixturevalue("module_servers").first()
    proc = DispatcherProcess(server.url, tmp_path_factory.mktemp("prop") / "d.log", "--procs", str(PROCS),
                             "--tasks", "e2e_tasks", "--max-retries", "0").wait_ready()
    yield server, proc
    proc.close()


@pytest.mark.timeout(240)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(elements, min_size=1, max_size=12))
def test_every_element_ends_as_a_result_or_a_dead_letter(live, r_module, batch):
    server, proc = live
    r = r_module
    dead_before = r.llen("dispatcher:dead")
    ids = []
    for n, (kind, value) in enumerate(batch):
        if kind == "raw":
            raw = value
        else:
            value = dict(value, id=f"p{r.incr('prop:n')}", result=True)
            ids.append(value["id"])
            try:
                raw = json.dumps(value).encode() if kind == "json" else msgpack.packb(value)
            except (OverflowError, ValueError):
                raw = json.dumps(value).encode()
        r.lpush("dispatcher:" + ("high", "normal", "low")[n % 3], raw)

    def settled():
        # a task that ran ends with a result (ok or error; an error also leaves a dead letter
        # naming its task_id); an element that could not run ends as a dead letter naming none
        results = sum(r.exists(f"dispatcher:result:{i}") for i in ids)
        added = r.llen("dispatcher:dead") - dead_before
        new_dead = r.lrange("dispatcher:dead", 0, added - 1) if added else []   # newest first
        invalid = sum(not r.hexists(f"dispatcher:dead:{d.decode()}", "task_id") for d in new_dead)
        queued = sum(r.llen(f"dispatcher:{p}") for p in ("high", "normal", "low"))
        return queued == 0 and results + invalid == len(batch)

    wait_for(settled, 30, what="every element to end as a result or a dead letter")
    assert proc.proc.poll() is None, proc.log
    [did] = [i.decode() for i in r.smembers("dispatcher:dispatchers")]
    wait_for(lambda: r.llen(f"dispatcher:dispatcher:{did}:tokens") == PROCS, 10, what="all tokens back")
