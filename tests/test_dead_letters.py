"""Dead letters that are not what the dispatcher writes: ids that are not UTF-8, entries that
cannot be requeued. Checked at the data level and through the real CLI against a real server."""
from __future__ import annotations

import json

from dispatcher.keys import Keys
from dispatcher.store import Store
from procs import run_cli

KEYS = Keys("dispatcher")  # the CLI's default prefix
JUNK = b"\xffjunk\xfe"     # an id a producer pushed by mistake; not UTF-8


def add_letter(r, dead_id: str | bytes, payload: bytes = b'{"task": "t.echo"}',
               queue: str = "dispatcher:normal") -> None:
    """Write a dead letter the way finish.lua does: the hash, then the id at the head."""
    key = KEYS.dead_entry("").encode() + (dead_id if isinstance(dead_id, bytes) else dead_id.encode())
    r.hset(key, mapping={"payload": payload, "queue": queue, "reason": "test", "dead_at": "now"})
    r.lpush(KEYS.dead, dead_id)


def test_store_lists_requeues_and_purges_ids_that_are_not_utf8(r):
    store = Store(r, KEYS)
    add_letter(r, "good")
    add_letter(r, JUNK, payload=b"junk payload")
    r.lpush(KEYS.dead, b"\xc3(")                      # an id alone, with no hash
    letters = store.dead_letters()
    assert [d.raw_id for d in letters] == [b"\xc3(", JUNK, b"good"]
    assert [d.id for d in letters] == ["\\xc3(", "\\xffjunk\\xfe", "good"]
    assert letters[1].fields["payload"] == b"junk payload" and letters[0].fields == {}
    assert store.requeue_dead(JUNK) == "requeued"
    assert r.lrange("dispatcher:normal", 0, -1) == [b"junk payload"]
    assert store.purge_dead() == 2
    assert r.llen(KEYS.dead) == 0 and r.keys("dispatcher:dead*") == []


def test_cli_lists_requeues_and_purges_ids_that_are_not_utf8(r, redis_url):
    add_letter(r, "good")
    add_letter(r, JUNK, payload=b"junk payload")
    add_letter(r, "later")
    listed = run_cli("dead", "list", url=redis_url)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert "\\xffjunk\\xfe" in listed.stdout and "good" in listed.stdout
    as_json = json.loads(run_cli("dead", "list", "--json", url=redis_url, check=True).stdout)
    assert [d["id"] for d in as_json] == ["later", "\\xffjunk\\xfe", "good"]
    assert "id_base64" not in as_json[0] and as_json[1]["id_base64"] == "/2p1bmv+"

    requeued = run_cli("dead", "requeue", "--all", url=redis_url)
    assert requeued.returncode == 0 and "Traceback" not in requeued.stderr, requeued.stderr
    assert "requeued 3 dead letter(s)" in requeued.stdout
    assert r.llen(KEYS.dead) == 0 and r.llen("dispatcher:normal") == 3

    add_letter(r, "another")
    r.lpush(KEYS.dead, JUNK)                          # an id alone, with no hash
    purged = run_cli("dead", "purge", "--json", url=redis_url)
    assert purged.returncode == 0 and "Traceback" not in purged.stderr, purged.stderr
    assert json.loads(purged.stdout) == {"purged": 2}
    assert r.llen(KEYS.dead) == 0 and r.keys("dispatcher:dead*") == []


def test_requeue_checks_before_it_writes_and_leaves_the_letter_in_place(r):
    store = Store(r, KEYS)
    r.hset("my:hash", "f", "v")
    add_letter(r, "to-hash", queue="my:hash")
    add_letter(r, "no-payload")
    r.hdel(KEYS.dead_entry("no-payload"), "payload")
    r.lpush(KEYS.dead, "no-hash")
    r.set(KEYS.dead_entry("a-string"), "x")
    r.lpush(KEYS.dead, "a-string")
    before = r.lrange(KEYS.dead, 0, -1)
    assert store.requeue_dead("to-hash") == "queue my:hash holds a hash, not a list"
    assert store.requeue_dead("no-payload") == "it has no payload"
    assert store.requeue_dead("no-hash") == "its hash dispatcher:dead:no-hash is missing"
    assert store.requeue_dead("a-string") == "dispatcher:dead:a-string is a string, not a hash"
    assert store.requeue_dead("never-there") == "not found"
    assert r.lrange(KEYS.dead, 0, -1) == before       # nothing written
    assert r.hgetall(KEYS.dead_entry("to-hash"))[b"payload"] == b'{"task": "t.echo"}'
    assert r.hgetall("my:hash") == {b"f": b"v"} and r.keys("dispatcher:normal") == []
    r.delete("my:hash")                               # fixed: now it can go back
    assert store.requeue_dead("to-hash") == "requeued"
    assert r.lrange("my:hash", 0, -1) == [b'{"task": "t.echo"}']
    assert not r.exists(KEYS.dead_entry("to-hash")) and b"to-hash" not in r.lrange(KEYS.dead, 0, -1)


def test_cli_requeue_says_why_a_letter_stays_and_exits_non_zero(r, redis_url):
    r.hset("my:hash", "f", "v")
    add_letter(r, "to-hash", queue="my:hash")
    failed = run_cli("dead", "requeue", "to-hash", url=redis_url)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.strip() == ("cannot requeue dead letter to-hash: queue my:hash holds a hash, "
                                     "not a list; it stays in the dead-letter list")
    assert "requeued 0 dead letter(s)" in failed.stdout
    assert r.lrange(KEYS.dead, 0, -1) == [b"to-hash"] and r.exists(KEYS.dead_entry("to-hash"))

    add_letter(r, "good")
    r.lpush(KEYS.dead, JUNK)                          # a producer's mistake: an id with no hash
    both = run_cli("dead", "requeue", "--all", "--json", url=redis_url)
    assert both.returncode == 1 and "Traceback" not in both.stderr, both.stderr
    assert json.loads(both.stdout) == {"requeued": ["good"], "not_found": [], "failed": {
        "\\xffjunk\\xfe": "its hash dispatcher:dead:\\xffjunk\\xfe is missing",
        "to-hash": "queue my:hash holds a hash, not a list"}}
    assert len(both.stderr.strip().splitlines()) == 2
    assert r.lrange(KEYS.dead, 0, -1) == [JUNK, b"to-hash"]
    assert run_cli("dead", "requeue", "gone", url=redis_url).returncode == 1


def test_dead_list_limit_must_be_one_or_more(r, redis_url):
    for dead_id in ("a", "b", "c"):
        add_letter(r, dead_id)
    for bad in ("0", "-1", "x"):
        refused = run_cli("dead", "list", "--limit", bad, url=redis_url)
        assert refused.returncode == 2 and "--limit: must be a whole number, 1 or more" in refused.stderr
    shown = json.loads(run_cli("dead", "list", "--json", "--limit", "2", url=redis_url, check=True).stdout)
    assert [d["id"] for d in shown] == ["c", "b"]


def test_requeue_takes_a_task_id_too(r, redis_url):
    """The id a person has at hand at 3 a.m. is the task's, from their own logs: it used to say
    "not found"."""
    add_letter(r, "letter-1")
    r.hset(KEYS.dead_entry("letter-1"), "task_id", "task-42")
    out = run_cli("dead", "requeue", "task-42", "--json", url=redis_url)
    assert out.returncode == 0 and json.loads(out.stdout) == {"requeued": ["task-42"], "not_found": []}
    assert r.lrange("dispatcher:normal", 0, -1) == [b'{"task": "t.echo"}'] and r.llen(KEYS.dead) == 0
    out = run_cli("dead", "requeue", "task-42", url=redis_url)
    assert out.returncode == 1 and "not found: task-42" in out.stdout
