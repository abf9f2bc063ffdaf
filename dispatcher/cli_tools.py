"""The operator's commands: enqueue, status, dead list/requeue/purge.

Part of the CLI layer (it prints); kept apart from __main__ so each file stays small. These
commands never start a server: they talk to the one the dispatcher uses.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any, Callable

from dispatcher.client import Client
from dispatcher.codec import JSON, Task, decode_value, new_task_id
from dispatcher.errors import ConfigError, ResultTimeout, TaskFailed
from dispatcher.keys import PRIORITIES, Keys
from dispatcher.server import running_server_url
from dispatcher.store import NOT_FOUND, REQUEUED, DeadLetter, Store, connect


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    enq = sub.add_parser("enqueue", help="push one task (as JSON, like redis-cli would)")
    enq.add_argument("name", help="registered task name, e.g. example.square")
    enq.add_argument("args", nargs="?", default="[]", help="positional arguments as a JSON list")
    enq.add_argument("--kwargs", default="{}", help="keyword arguments as a JSON object")
    enq.add_argument("--priority", choices=PRIORITIES, default="normal")
    enq.add_argument("--wait", action="store_true", help="wait for the result and print it")
    enq.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")
    enq.set_defaults(handler=cmd_enqueue)

    status = sub.add_parser("status", help="queue lengths, dispatchers, in-flight tasks, dead letters")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--in-flight", action="store_true",
                        help="also list each dispatcher's tasks in flight: slot, list, task and id")
    status.set_defaults(handler=cmd_status)

    dead = sub.add_parser("dead", help="inspect and act on dead letters")
    dead_sub = dead.add_subparsers(dest="dead_command", metavar="ACTION", required=True)
    listing = dead_sub.add_parser("list", help="show dead letters, newest first")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument("--limit", type=_at_least_one, default=100,
                         help="most entries shown, 1 or more (default 100)")
    listing.set_defaults(handler=cmd_dead_list)
    requeue = dead_sub.add_parser("requeue", help="put dead letters back on their lists")
    requeue.add_argument("ids", nargs="*", metavar="ID",
                         help="a dead-letter id (from `dead list`), or a task id: its dead letters")
    requeue.add_argument("--all", action="store_true", help="every dead letter")
    requeue.add_argument("--json", action="store_true", help="print JSON")
    requeue.set_defaults(handler=cmd_dead_requeue)
    purge = dead_sub.add_parser("purge", help="delete every dead letter")
    purge.add_argument("--json", action="store_true", help="print JSON")
    purge.set_defaults(handler=cmd_dead_purge)
    for parser in (enq, status, listing, requeue, purge):
        common(parser)


def _at_least_one(text: str) -> int:
    """--limit N shows entries 0..N-1: 0 would show them all and -1 all but the last."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("must be a whole number, 1 or more")
    return value


def _url(args: argparse.Namespace) -> str:
    return args.redis_url or running_server_url(args.state_dir, local_url=args.local_url)


def _store(args: argparse.Namespace) -> Store:
    return Store(connect(_url(args)), Keys(args.prefix))


def cmd_enqueue(args: argparse.Namespace) -> int:
    try:
        call_args, call_kwargs = json.loads(args.args), json.loads(args.kwargs)
    except ValueError as exc:
        raise ConfigError(f"args and --kwargs must be JSON: {exc}") from exc
    if not isinstance(call_args, list) or not isinstance(call_kwargs, dict):
        raise ConfigError("args must be a JSON list and --kwargs a JSON object")
    task = Task(name=args.name, args=tuple(call_args), kwargs=call_kwargs, id=new_task_id(),
                codec=JSON, want_result=args.wait)
    try:  # Python's json reads what JSON cannot carry
        element = task.encode()
    except UnicodeEncodeError as exc:
        raise ConfigError(f"args and --kwargs must be JSON without lone surrogates: {exc.object[exc.start]!r} "
                          "is half of a UTF-16 pair, not a character") from exc
    except ValueError as exc:
        raise ConfigError("args and --kwargs must be JSON without NaN or Infinity (a number too large "
                          "for a float, like 1e999, reads as Infinity)") from exc
    client = Client(_url(args), prefix=args.prefix)
    client.store.push(args.priority, [element])
    print(task.id)
    if not args.wait:
        return 0
    try:
        print(json.dumps(client.handle(task.id, task.name).result(timeout=args.timeout)))
    except TaskFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except ResultTimeout as exc:
        print(str(exc), file=sys.stderr)
        return 3
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = _store(args)
    status = store.status()
    if args.in_flight:
        for did, d in status["dispatchers"].items():
            d["tasks"] = [{"slot": slot, "queue": queue, **_task_of(element)}
                          for slot, queue, element in store.in_flight(did)] if d["in_flight"] is not None else []
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"{'queue':<10}{'waiting':>10}{'scheduled':>11}")
    for priority in PRIORITIES:
        print(f"{priority:<10}{_count(status['queues'][priority]):>10}{_count(status['scheduled'][priority]):>11}")
    print(f"dead letters: {_count(status['dead'])}")
    for key, kind in status["broken"].items():
        print(f"BROKEN: {key} holds a {kind}, set by hand? Dispatchers wait until it is renamed or deleted")
    if not status["dispatchers"]:
        print("dispatchers: none")
    for did, d in status["dispatchers"].items():
        info = d["info"] or {}
        state = "alive" if d["alive"] else "DEAD (tasks are put back by the next live dispatcher)"
        print(f"dispatcher {did}: {state}; in flight {_count(d['in_flight'])}, free tokens {_count(d['free_tokens'])}"
              f"{'; procs %s, pid %s, since %s' % (info.get('procs'), info.get('pid'), info.get('started')) if info else ''}")
        for task in d.get("tasks", ()):
            print(f"  slot {task['slot']}: {task['task']} {task['id']} (from {task['queue']})")
    return 0


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)  # None: the key holds another type (see BROKEN)


def _task_of(element: bytes) -> dict[str, str]:
    """Its name and id, as far as the element says (an element that is not a task is shown as such)."""
    try:
        fields = decode_value(element)
    except Exception:  # noqa: BLE001 -- whatever it is, status must show the rest
        fields = None
    if not isinstance(fields, dict):
        return {"task": "<not a task>", "id": "-"}
    return {"task": str(fields.get("task", "?")), "id": str(fields.get("id") or "-")}


def _printable(fields: dict[str, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in fields.items():
        try:
            out[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            out[name + "_base64"] = base64.b64encode(value).decode()
    return out


def _json_letter(letter: DeadLetter) -> dict[str, Any]:
    """The id as text (escaped if need be), plus its exact bytes when they are not UTF-8."""
    out: dict[str, Any] = {"id": letter.id}
    if letter.id.encode() != letter.raw_id:
        out["id_base64"] = base64.b64encode(letter.raw_id).decode()
    return {**out, **_printable(letter.fields)}


def _shown(raw_id: bytes) -> str:
    return raw_id.decode("utf-8", "backslashreplace")


def cmd_dead_list(args: argparse.Namespace) -> int:
    letters = _store(args).dead_letters(0, args.limit - 1)
    if args.json:
        print(json.dumps([_json_letter(d) for d in letters], indent=2))
        return 0
    if not letters:
        print("no dead letters")
    for d in letters:
        f = _printable(d.fields)
        payload = ("<none>" if "payload" not in d.fields
                   else f.get("payload") or f"<{len(d.fields['payload'])} bytes, not text>")
        print(f"{d.id}  {f.get('dead_at', '?')}  from {f.get('queue', '?')}  attempts {f.get('attempts', '?')}")
        print(f"    reason: {f.get('reason', '?')}")
        if f.get("error"):
            print(f"    error:  {f['error']}: {f.get('message', '')}")
        print(f"    payload: {payload[:300]}")
    return 0


def cmd_dead_requeue(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.all == bool(args.ids):
        raise ConfigError("give dead-letter ids or --all (not both)")
    # ids from argv are str that Python decoded with surrogateescape: this gives back their bytes
    ids = ([d.raw_id for d in store.dead_letters()] if args.all
           else [i.encode("utf-8", "surrogateescape") for i in args.ids])
    done, missing, failed = [], [], {}
    by_task: dict[bytes, list[bytes]] | None = None
    for raw_id in ids:
        outcome = store.requeue_dead(raw_id)
        if outcome == NOT_FOUND and not args.all:  # maybe a task id: the one a person has at hand
            if by_task is None:
                by_task = {}
                for letter in store.dead_letters():
                    by_task.setdefault(letter.fields.get("task_id", b""), []).append(letter.raw_id)
            for letter_id in by_task.pop(raw_id, []):
                outcome = store.requeue_dead(letter_id)
                if outcome != REQUEUED:
                    break
        if outcome == REQUEUED:
            done.append(_shown(raw_id))
        elif outcome == NOT_FOUND:
            missing.append(_shown(raw_id))
        else:
            failed[_shown(raw_id)] = outcome
    if args.json:
        # "failed" only when there is one: scripts written for the old two keys keep working
        print(json.dumps({"requeued": done, "not_found": missing, **({"failed": failed} if failed else {})}))
    else:
        print(f"requeued {len(done)} dead letter(s)" + (f"; not found: {' '.join(missing)}" if missing else ""))
    for shown, why in failed.items():
        print(f"cannot requeue dead letter {shown}: {why}; it stays in the dead-letter list", file=sys.stderr)
    return 0 if not missing and not failed else 1


def cmd_dead_purge(args: argparse.Namespace) -> int:
    purged = _store(args).purge_dead()
    print(json.dumps({"purged": purged}) if args.json else f"purged {purged} dead letter(s)")
    return 0
