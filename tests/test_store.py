"""The server-side scripts, checked at the data level against a real server."""
from __future__ import annotations

import json
import logging
import threading
import time

import msgpack
import pytest

from dispatcher.errors import BrokenKey, LostId, UnpackableItems
from dispatcher.keys import Keys
from dispatcher.store import Store

KEYS = Keys("t")


def make_store(r, holds: tuple[str, ...] = ("d1",)) -> Store:
    """A store whose process holds these dispatcher ids (a fetch without a heartbeat takes nothing)."""
    store = Store(r, KEYS)
    for dispatcher_id in holds:
        store.take_over(dispatcher_id, {"pid": 0}, 600_000)
    return store


def test_fetch_takes_highest_priority_first_oldest_first_one_token_each(r):
    store = make_store(r)
    store.reconcile("d1", 3)
    store.push("low", [b"l1"])
    store.push("normal", [b"n1", b"n2"])
    store.push("high", [b"h1"])
    got = store.fetch("d1", 10)
    assert [(f.queue, f.element) for f in got] == [("t:high", b"h1"), ("t:normal", b"n1"), ("t:normal", b"n2")]
    assert sorted(f.slot for f in got) == [0, 1, 2]
    assert r.llen(KEYS.tokens("d1")) == 0
    assert store.fetch("d1", 10) == -2          # no free token: never more tasks than workers
    assert r.lrange("t:low", 0, -1) == [b"l1"]
    inflight = r.hgetall(KEYS.inflight("d1"))
    assert inflight[b"0"] == b"h1" and inflight[b"0:q"] == b"t:high"


def test_fetch_of_one_list_takes_high_tasks_only(r):
    store = make_store(r)
    store.reconcile("d1", 3)
    store.push("low", [b"l1"])
    store.push("high", [b"h1"])
    got = store.finish_and_fetch("d1", [], 3, lists=1)
    assert [(f.queue, f.element) for f in got] == [("t:high", b"h1")]
    assert store.finish_and_fetch("d1", [], 2, lists=1) == -1   # no high task: "nothing waits"
    assert r.lrange("t:low", 0, -1) == [b"l1"] and r.llen(KEYS.tokens("d1")) == 2


def test_fetch_reports_when_nothing_is_waiting(r):
    store = make_store(r)
    store.reconcile("d1", 1)
    assert store.fetch("d1", 1) == -1
    store.schedule("low", int(time.time() * 1000) + 60_000, [b"later"])
    wait = store.fetch("d1", 1)
    assert 50_000 < wait <= 61_000


def test_due_scheduled_tasks_are_promoted_exactly_once_across_dispatchers(r):
    store = make_store(r, holds=("a", "b"))
    for d in ("a", "b"):
        store.reconcile(d, 50)
    store.schedule("normal", int(time.time() * 1000) - 1, [b"x%d" % i for i in range(60)])
    taken = []
    threads = [threading.Thread(target=lambda d=d: taken.extend(_drain(store, d))) for d in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(b"x%d" % i for i in range(60))  # 60 distinct: none twice, none lost
    assert r.zcard(KEYS.schedule("normal")) == 0


def _drain(store, dispatcher_id):
    out = []
    for _ in range(5):
        got = store.fetch(dispatcher_id, 50)
        if isinstance(got, list):
            out.extend(f.element for f in got)
            store.finish(dispatcher_id, [{"slot": f.slot, "action": "ack", "result_key": "", "reply_to": "",
                                          "reply": b"", "ttl": 1} for f in got])
    return out


def test_finish_writes_outcomes_returns_tokens_and_is_idempotent(r):
    store = make_store(r)
    store.reconcile("d1", 2)
    store.push("normal", [b"a", b"b"])
    a, b = store.fetch("d1", 2)
    items = [
        {"slot": a.slot, "action": "ack", "result_key": "t:result:1", "reply_to": "reply", "reply": b"R", "ttl": 50},
        {"slot": b.slot, "action": "retry", "schedule_key": "t:schedule:normal", "due": 5, "payload": b"b2"},
    ]
    assert store.finish("d1", items) == 2
    assert store.finish("d1", items) == 0            # a replay after a lost reply writes nothing twice
    assert r.lrange("t:result:1", 0, -1) == [b"R"] and 0 < r.ttl("t:result:1") <= 50
    assert r.lrange("reply", 0, -1) == [b"R"]
    assert r.zrange("t:schedule:normal", 0, -1) == [b"b2"]
    assert r.llen(KEYS.tokens("d1")) == 2 and r.hlen(KEYS.inflight("d1")) == 0


def test_batches_beyond_luas_unpack_limit_are_taken_and_finished_whole(r):
    """fetch records and finish releases in batched calls, chunked under Lua's unpack limit."""
    store = make_store(r)
    store.reconcile("d1", 2500)
    store.push("normal", [b"e%d" % i for i in range(1500)])
    store.push("low", [b"l%d" % i for i in range(1500)])
    got = store.fetch("d1", 2500)
    assert len(got) == 2500 and len({f.slot for f in got}) == 2500
    assert r.hlen(KEYS.inflight("d1")) == 5000 and r.llen(KEYS.tokens("d1")) == 0
    # plain acks (the slot alone) and full acks with no reply mixed: both release the same way
    items = [{"slot": f.slot} if f.slot % 2 else
             {"slot": f.slot, "action": "ack", "result_key": "", "reply_to": "", "reply": b"", "ttl": 1}
             for f in got]
    assert store.finish("d1", items + items[:3]) == 2500   # a repeated slot is applied once
    assert r.hlen(KEYS.inflight("d1")) == 0
    assert sorted(map(int, r.lrange(KEYS.tokens("d1"), 0, -1))) == list(range(2500))
    assert r.llen("t:normal") == 0 and r.llen("t:low") == 500


def three_in_flight(r) -> tuple[Store, list]:
    """d1 holds a, b and c (in that order) out of three slots."""
    store = make_store(r)
    store.reconcile("d1", 3)
    store.push("normal", [b"a", b"b", b"c"])
    return store, store.fetch("d1", 3)


def test_a_finish_that_meets_a_key_of_another_type_writes_nothing(r):
    """Redis keeps a script's writes made before an error: the keys are checked first."""
    store, (a, b, c) = three_in_flight(r)
    r.set("not-a-list", "x")
    items = [
        {"slot": a.slot, "action": "ack", "result_key": "", "reply_to": "", "reply": b"", "ttl": 50},
        {"slot": b.slot, "action": "ack", "result_key": "t:result:b", "reply_to": "", "reply": b"B", "ttl": 50},
        {"slot": c.slot, "action": "dead", "dead_id": "x", "dead_list": "not-a-list", "dead_key": "t:dead:x",
         "fields": {"reason": "r"}, "result_key": "", "reply_to": "", "reply": b"", "ttl": 50},
    ]
    with pytest.raises(BrokenKey, match="^not-a-list holds a string, not a list"):
        store.finish("d1", items)
    assert not r.exists("t:result:b") and r.llen(KEYS.tokens("d1")) == 0
    assert r.hlen(KEYS.inflight("d1")) == 6                        # every lease still there
    r.delete("not-a-list")
    assert store.finish("d1", items) == 3
    assert store.finish("d1", items) == 0            # a retry finds no lease: nothing written again
    assert r.lrange("t:result:b", 0, -1) == [b"B"]
    assert r.llen(KEYS.tokens("d1")) == 3 and r.hlen(KEYS.inflight("d1")) == 0


def test_a_reply_to_that_refuses_the_outcome_keeps_it_under_the_result_key_and_says_so(r, caplog):
    """reply_to is the producer's key: one of another type must neither abort the batch (the
    other outcomes, the tokens) nor lose the outcome."""
    store, (a, b, c) = three_in_flight(r)
    r.set("not-a-list", "x")
    items = [
        {"slot": a.slot, "action": "ack", "result_key": "", "reply_to": "not-a-list", "reply": b"A",
         "ttl": 50, "keep_key": "t:result:a"},
        {"slot": b.slot, "action": "ack", "result_key": "t:result:b", "reply_to": "replies", "reply": b"B",
         "ttl": 50, "keep_key": "t:result:b"},
        {"slot": c.slot, "action": "dead", "dead_id": "x", "dead_list": KEYS.dead, "dead_key": KEYS.dead_entry("x"),
         "fields": {"reason": "r"}, "result_key": "t:result:c", "reply_to": "not-a-list", "reply": b"C",
         "ttl": 50, "keep_key": "t:result:c"},
    ]
    caplog.set_level(logging.WARNING)
    assert store.finish_and_fetch("d1", items, 0) == []
    assert r.get("not-a-list") == b"x"
    assert r.lrange("t:result:a", 0, -1) == [b"A"] and 0 < r.ttl("t:result:a") <= 50
    assert r.lrange("replies", 0, -1) == [b"B"] and r.lrange("t:result:b", 0, -1) == [b"B"]
    assert r.lrange("t:result:c", 0, -1) == [b"C"] and r.llen(KEYS.dead) == 1
    assert r.llen(KEYS.tokens("d1")) == 3 and r.hlen(KEYS.inflight("d1")) == 0
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "reply_to 'not-a-list' (WRONGTYPE" in warnings[0] and "kept under t:result:a for 50s" in warnings[0]
    assert "kept under t:result:c" in warnings[1]


@pytest.mark.parametrize("broken", ["t:normal", "t:high", "inflight", "tokens", "t:schedule:low"])
def test_a_fetch_that_meets_a_key_of_another_type_takes_nothing_and_names_it(r, broken):
    """Redis keeps a script's writes made before an error: a fetch that popped the high list
    and then failed on a normal list made a string by hand lost the high tasks."""
    store = make_store(r)
    store.reconcile("d1", 3)
    store.push("high", [b"h1", b"h2"])
    r.zadd(KEYS.schedule("normal"), {b"due": 0})
    key = {"inflight": KEYS.inflight("d1"), "tokens": KEYS.tokens("d1")}.get(broken, broken)
    saved = r.dump(key)
    r.delete(key)
    r.set(key, "oops")
    with pytest.raises(BrokenKey, match=f"^{key} holds a string, not a"):
        store.finish_and_fetch("d1", [], 3)
    if broken != "t:high":
        assert r.lrange("t:high", 0, -1) == [b"h2", b"h1"]
    moved = r.lrange("t:normal", 0, -1) if broken != "t:normal" else []
    assert r.zcard(KEYS.schedule("normal")) + moved.count(b"due") == 1  # still due, or on its list
    r.delete(key)
    if saved is not None:
        r.restore(key, 0, saved)
    assert len(store.finish_and_fetch("d1", [], 3)) == 3            # mended: h1, h2, then the due one


def test_outcomes_that_cannot_be_packed_are_named_and_nothing_is_written(r):
    store = make_store(r)
    store.reconcile("d1", 2)
    store.push("normal", [b"a", b"b"])
    a, b = store.fetch("d1", 2)
    items = [{"slot": a.slot}, {"slot": b.slot, "action": "ack", "result_key": "t:result:\udcff", "reply_to": "",
                                "reply": b"B", "ttl": 5}]
    with pytest.raises(UnpackableItems) as caught:
        store.finish_and_fetch("d1", items, 0)
    assert caught.value.bad == [1] and "surrogates not allowed" in caught.value.why
    assert r.hlen(KEYS.inflight("d1")) == 4                           # nothing was written


def test_a_process_whose_id_another_holds_now_can_write_nothing_to_its_records(r):
    """Cut off (or paused) past its heartbeat's TTL, a dispatcher's id may be claimed by another
    process: from then on each write of the first would land in the second's records."""
    old, new = make_store(r, holds=()), make_store(r, holds=())
    info = {"host": "h", "pid": 1}
    assert old.claim("d1", info, 60_000)
    old.reconcile("d1", 2)
    old.push("normal", [b"a", b"b"])
    [a] = old.fetch("d1", 1)
    r.delete(KEYS.heartbeat("d1"))                                   # the lease lapsed...
    assert new.claim("d1", {"host": "h", "pid": 2}, 60_000)        # ...and another took the id
    new.reconcile("d1", 2)                                            # putting a back
    before = {k: r.dump(k) for k in (KEYS.inflight("d1"), KEYS.tokens("d1"), "t:normal")}
    for attempt in (lambda: old.fetch("d1", 1), lambda: old.finish_and_fetch("d1", [{"slot": a.slot}], 1),
                    lambda: old.finish("d1", [{"slot": a.slot}]), lambda: old.reconcile("d1", 2),
                    lambda: old.beat("d1", info, 60_000), lambda: old.forget("d1")):
        with pytest.raises(LostId, match='"pid": 2'):
            attempt()
    assert {k: r.dump(k) for k in before} == before and r.exists(KEYS.heartbeat("d1"))
    assert new.beat("d1", {"host": "h", "pid": 2}, 60_000) is True


def test_a_fetch_without_our_heartbeat_takes_nothing(r):
    """Lapsed, a dispatcher could take a task that a peer, seeing no heartbeat, put back at once:
    it ran twice, though it started after the lapse."""
    store = make_store(r)
    store.reconcile("d1", 2)
    store.push("normal", [b"a"])
    r.delete(KEYS.heartbeat("d1"))
    assert store.fetch("d1", 1) == -3 and r.llen("t:normal") == 1
    assert store.beat("d1", {"pid": 0}, 60_000) is False             # taken back...
    assert [f.element for f in store.fetch("d1", 1)] == [b"a"]     # ...then it fetches


def test_a_lapsed_heartbeat_nobody_claimed_is_taken_again(r):
    store = make_store(r, holds=())
    assert store.claim("d1", {"pid": 1}, 60_000)
    r.delete(KEYS.heartbeat("d1"))
    assert store.beat("d1", {"pid": 1}, 60_000) is False             # said, then held again
    assert store.beat("d1", {"pid": 1}, 60_000) is True


def test_putting_back_a_dead_peers_tasks_checks_every_list_first(r):
    """A failed RPUSH halfway left the tasks pushed before it on their lists and in flight too:
    each recovery pushed them again."""
    store = make_store(r)
    store.reconcile("d1", 2)
    store.push("high", [b"h"])
    store.push("low", [b"l"])
    store.fetch("d1", 2)
    r.delete(KEYS.heartbeat("d1"))                                   # then d1 died
    r.set("t:low", "oops")
    for _ in range(3):
        with pytest.raises(BrokenKey, match="^t:low holds a string, not a list"):
            store.recover_peer("d1")
    assert r.llen("t:high") == 0 and r.hlen(KEYS.inflight("d1")) == 4   # nothing written
    r.delete("t:low")
    assert store.recover_peer("d1") == 2 and r.lrange("t:high", 0, -1) == [b"h"]


@pytest.mark.parametrize("action", ["retry", "dead", "requeue"])
def test_an_outcome_whose_target_has_another_type_is_not_written_nor_its_lease_dropped(r, action):
    """Written after the lease is dropped, a failed write lost the task."""
    store = make_store(r)
    store.reconcile("d1", 1)
    store.push("normal", [b"a"])
    [a] = store.fetch("d1", 1)
    item = {"retry": {"slot": a.slot, "action": "retry", "due": 0, "schedule_key": "t:schedule:normal",
                      "payload": b"a2"},
            "dead": {"slot": a.slot, "action": "dead", "dead_id": "x", "dead_list": KEYS.dead,
                     "dead_key": KEYS.dead_entry("x"), "fields": {"reason": "r"}, "result_key": "",
                     "reply_to": "", "reply": b"", "ttl": 5},
            "requeue": {"slot": a.slot, "action": "requeue"}}[action]
    target = {"retry": "t:schedule:normal", "dead": KEYS.dead, "requeue": "t:normal"}[action]
    r.delete(target)
    r.set(target, "oops")
    with pytest.raises(BrokenKey, match=f"^{target} holds a string"):
        store.finish_and_fetch("d1", [item], 0)
    assert r.hlen(KEYS.inflight("d1")) == 2 and r.llen(KEYS.tokens("d1")) == 0
    r.delete(target)
    assert store.finish("d1", [item]) == 1


def test_after_a_lapse_only_the_entries_still_there_are_kept(r):
    """A peer may have put back what a lapsed dispatcher ran: writing those entries again would
    put them back a second time at the next recovery."""
    store = make_store(r, holds=())
    assert store.claim("d1", {"pid": 1}, 60_000)
    store.reconcile("d1", 3)
    store.push("normal", [b"a", b"b"])
    a, b = store.fetch("d1", 2)
    known = [(f.slot, f.queue, f.element) for f in (a, b)]
    r.hdel(KEYS.inflight("d1"), str(b.slot), f"{b.slot}:q")        # b put back by a peer
    assert store.reconcile("d1", 3, known, lapsed=True) == 0
    assert r.hgetall(KEYS.inflight("d1")) == {str(a.slot).encode(): b"a", f"{a.slot}:q".encode(): b"t:normal"}
    assert r.llen(KEYS.tokens("d1")) == 1                            # b's slot stays busy: it runs
    r.delete(KEYS.heartbeat("d1"))                                   # no heartbeat: the same
    r.hdel(KEYS.inflight("d1"), str(a.slot), f"{a.slot}:q")
    store.reconcile("d1", 3, known)
    assert r.hlen(KEYS.inflight("d1")) == 0
    store.claim("d1", {"pid": 1}, 60_000)
    store.reconcile("d1", 3, known)                                  # not lapsed: restored
    assert r.hlen(KEYS.inflight("d1")) == 4


def test_taking_over_a_dead_holders_id_fails_if_another_took_it_first(r):
    first, second, third = make_store(r, holds=()), make_store(r, holds=()), make_store(r, holds=())
    assert first.claim("d1", {"pid": 1}, 60_000)
    seen = json.loads(r.get(KEYS.heartbeat("d1")))
    assert second.take_over("d1", {"pid": 2}, 60_000, expected=seen)
    assert not third.take_over("d1", {"pid": 3}, 60_000, expected=seen)
    assert json.loads(r.get(KEYS.heartbeat("d1")))["pid"] == 2


def test_finish_dead_keeps_the_element_unchanged_and_requeue_goes_to_the_head(r):
    store = make_store(r)
    store.reconcile("d1", 2)
    store.push("high", [b"\xffbad", b"good"])
    bad, good = store.fetch("d1", 2)
    store.push("high", [b"newer"])
    store.finish("d1", [
        {"slot": bad.slot, "action": "dead", "dead_id": "x1", "dead_list": KEYS.dead,
         "dead_key": KEYS.dead_entry("x1"), "fields": {"reason": "not JSON", "dead_at": "now"},
         "result_key": "", "reply_to": "", "reply": b"", "ttl": 1},
        {"slot": good.slot, "action": "requeue"},
    ])
    assert r.lrange("t:high", 0, -1) == [b"newer", b"good"]   # right end is the head: good runs next
    [letter] = store.dead_letters()
    assert letter.fields["payload"] == b"\xffbad"
    assert letter.fields["queue"] == b"t:high" and letter.fields["reason"] == b"not JSON"
    assert store.requeue_dead("x1") == "requeued"
    assert store.requeue_dead("x1") == "not found"    # exactly once
    assert r.lrange("t:high", 0, -1) == [b"\xffbad", b"newer", b"good"]


def test_reconcile_puts_back_what_we_do_not_hold_and_restores_what_we_do(r):
    store, (a, b, c) = three_in_flight(r)                          # its heartbeat live: not a lapse
    r.hdel(KEYS.inflight("d1"), str(c.slot), f"{c.slot}:q")   # as if Redis lost that write
    requeued = store.reconcile("d1", 3, [(b.slot, b.queue, b.element), (c.slot, c.queue, c.element)])
    assert requeued == 1 and r.lrange("t:normal", 0, -1) == [b"a"]
    assert r.hget(KEYS.inflight("d1"), str(c.slot)) == b"c"
    assert r.lrange(KEYS.tokens("d1"), 0, -1) == [str(a.slot).encode()]


def test_a_dead_peer_is_recovered_once_and_a_live_one_is_left_alone(r):
    store = make_store(r, holds=())
    store.beat("dead", {"pid": 1}, 60_000)
    store.reconcile("dead", 2)
    store.push("high", [b"h"])
    store.push("low", [b"l"])
    store.fetch("dead", 2)
    assert store.recover_peer("dead") == -1            # heartbeat still there
    r.delete(KEYS.heartbeat("dead"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.recover_peer("dead"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 0, 0, 2]
    assert r.lrange("t:high", 0, -1) == [b"h"] and r.lrange("t:low", 0, -1) == [b"l"]
    assert not r.exists(KEYS.inflight("dead"), KEYS.tokens("dead"))
    assert store.dispatcher_ids() == []


def test_finish_item_encoding_survives_binary_payloads(r):
    store = make_store(r)
    store.reconcile("d1", 1)
    payload = msgpack.packb({"task": "x", "args": [b"\x00\xff"]})
    store.push("low", [payload])
    [f] = store.fetch("d1", 1)
    store.finish("d1", [{"slot": f.slot, "action": "requeue"}])
    assert r.lrange("t:low", 0, -1) == [payload]


def test_a_flushed_script_cache_never_orphans_a_fetched_batch(r):
    store = make_store(r)
    store.reconcile("d1", 4)
    store.push("normal", [b"a"])
    [a] = store.fetch("d1", 1)
    r.script_flush()
    assert store.fetch("d1", 1) == -1                     # reloads fetch.lua only
    store.push("normal", [b"b", b"c"])
    got = store.finish_and_fetch("d1", [{"slot": a.slot, "action": "requeue"}], 4)
    # finish got NOSCRIPT and was sent again; the fetch that ran was used, not repeated
    taken = sorted(f.element for f in got)
    inflight = r.hgetall(KEYS.inflight("d1"))
    assert sorted(v for k, v in inflight.items() if not k.endswith(b":q")) == taken
    assert sorted(taken + r.lrange("t:normal", 0, -1)) == [b"a", b"b", b"c"]


def test_a_first_finish_on_a_fresh_server_still_frees_its_slot_for_the_fetch_beside_it(r):
    store = make_store(r)
    store.reconcile("d1", 1)
    store.push("normal", [b"a", b"b"])
    [a] = store.fetch("d1", 1)                            # the only token is taken
    r.script_flush()
    store.fetch("d1", 1)                                  # fetch.lua is loaded again, finish.lua not
    got = store.finish_and_fetch("d1", [{"slot": a.slot, "action": "requeue"}], 1)
    assert [f.element for f in got] == [b"a"]             # put back, then taken: not -2, "no free token"


def test_forget_puts_back_anything_still_recorded(r):
    store = make_store(r)
    store.beat("d1", {"pid": 1}, 60_000)
    store.reconcile("d1", 2)
    store.push("high", [b"orphan"])
    store.fetch("d1", 2)
    assert store.forget("d1") == 1
    assert r.lrange("t:high", 0, -1) == [b"orphan"]
    assert not r.exists(KEYS.inflight("d1"), KEYS.tokens("d1"), KEYS.heartbeat("d1"))
    assert store.dispatcher_ids() == []
