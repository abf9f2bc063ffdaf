"""What the loop says about trouble it waits out (dispatcher.incidents): at the start, again each
minute while it lasts, and at the end."""
from __future__ import annotations

import logging

import pytest
import redis

from dispatcher import incidents
from dispatcher.errors import BrokenKey
from dispatcher.incidents import BACKOFF_FIRST, BACKOFF_MAX, Incidents


@pytest.fixture
def said(caplog):
    caplog.set_level(logging.INFO, logger=incidents.__name__)
    return lambda: [(rec.levelname, rec.getMessage()) for rec in caplog.records]


def test_an_outage_is_said_when_it_starts_while_it_lasts_and_when_it_ends(said, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(incidents.time, "monotonic", lambda: now[0])
    trouble = Incidents()
    delays = [trouble.redis_down(redis.ConnectionError("refused"), 2, 3) for _ in range(8)]
    assert delays[0] == BACKOFF_FIRST and delays[1] == 2 * BACKOFF_FIRST and delays[-1] == BACKOFF_MAX
    assert [level for level, _ in said()] == ["ERROR"]                 # once, not at every try
    now[0] += incidents.REMINDER
    trouble.redis_down(redis.AuthenticationError("WRONGPASS"), 2, 3)
    level, line = said()[-1]
    assert level == "ERROR" and "still unreachable after 60s" in line and "refuses this dispatcher's password" in line
    trouble.redis_back()
    assert said()[-1][1].startswith("Redis is back after 60.0s") and trouble.delay == BACKOFF_FIRST
    trouble.redis_back()                                              # nothing more to say
    assert len(said()) == 3


def test_a_broken_key_is_said_once_a_minute_and_when_it_is_mended(said, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(incidents.time, "monotonic", lambda: now[0])
    trouble = Incidents()
    trouble.key_ok()
    for _ in range(3):
        trouble.broken_key(BrokenKey("p:normal holds a string, not a list"))
    trouble.broken_key(BrokenKey("p:low holds a hash, not a list"))   # another key: said at once
    now[0] += incidents.REMINDER
    trouble.broken_key(BrokenKey("p:low holds a hash, not a list"))
    trouble.key_ok()
    trouble.key_ok()
    assert [line.split(".")[0] for _, line in said()] == [
        "cannot go on: p:normal holds a string, not a list", "cannot go on: p:low holds a hash, not a list",
        "cannot go on: p:low holds a hash, not a list", "going on: the key is mended"]
