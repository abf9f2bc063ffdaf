"""dispatcher.batching: which tasks may share a Pool job, and how many (no processes here)."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.batching import MAX_BATCH, Batcher
from dispatcher.errors import ConfigError
from dispatcher.settings import Settings

BUDGET = 0.002


def test_a_name_never_seen_runs_alone():
    assert Batcher(2, BUDGET).size("new", 64) == 1


def test_quick_names_fill_a_share_of_the_fetch_that_leaves_each_child_two_batches():
    batcher = Batcher(2, BUDGET)
    batcher.observe("quick", 20e-6)
    assert batcher.size("quick", 64) == 16
    assert batcher.size("quick", 9) == 3
    assert batcher.size("quick", 2) == 1          # no more than the idle children: --prefetch 0
    batcher.observe("quicker", 1e-7)
    assert Batcher(1, BUDGET).size("x", 1000) == 1 and batcher.size("quicker", 10_000) == MAX_BATCH


def test_a_batch_holds_at_most_the_budget_of_recent_work():
    batcher = Batcher(1, BUDGET)
    batcher.observe("half-ms", 0.0005)
    assert batcher.size("half-ms", 64) == int(BUDGET / 0.0005)


def test_one_slow_run_stops_batching_until_quick_runs_bring_it_down():
    batcher = Batcher(2, BUDGET)
    batcher.observe("t", 10e-6)
    batcher.observe("t", 0.05)
    assert batcher.size("t", 64) == 1
    runs = 0
    while batcher.size("t", 64) == 1:
        batcher.observe("t", 10e-6)
        runs += 1
    assert runs == math.ceil(math.log(0.05 / (BUDGET / 2)) / math.log(1 / 0.9))


def test_a_budget_of_zero_batches_nothing():
    batcher = Batcher(2, 0.0)
    batcher.observe("t", 1e-9)
    assert batcher.size("t", 64) == 1


def test_a_lost_child_counts_as_slow():
    batcher = Batcher(2, BUDGET)
    batcher.observe("t", 10e-6)
    batcher.observe("t", None)
    assert batcher.size("t", 64) == 1


@given(procs=st.integers(1, 64), fetched=st.integers(0, 10_000),
       runs=st.lists(st.one_of(st.none(), st.floats(0, 100)), max_size=50))
def test_size_is_between_one_and_a_share_of_the_fetch(procs, fetched, runs):
    batcher = Batcher(procs, BUDGET)
    for seconds in runs:
        batcher.observe("t", seconds)
    size = batcher.size("t", fetched)
    assert 1 <= size <= MAX_BATCH
    assert size == 1 or (fetched > procs and size <= math.ceil(fetched / (2 * procs)))


@pytest.mark.parametrize("budget", [-0.001, 61.0, math.inf, math.nan])
def test_the_budget_is_checked_with_the_settings(budget):
    with pytest.raises(ConfigError, match="--batch-budget"):
        Settings(batch_budget=budget)


@pytest.mark.parametrize(("prefetch", "batch", "refill_at"),
                         [(0, 64, 1), (1, 64, 1), (3, 64, 1), (4, 64, 2), (64, 64, 32), (256, 64, 64)])
def test_a_deep_prefetch_is_refilled_by_halves_of_at_most_a_fetch(prefetch, batch, refill_at):
    settings = Settings(procs=2, prefetch=prefetch, batch=batch)
    assert settings.refill_at == refill_at
