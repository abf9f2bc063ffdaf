"""Every Redis key name, built in one place.

Users look at these with redis-cli at 3 a.m., so the schema is documented here and in the README
and nowhere else builds a key by hand. With Redis Cluster, put a hash tag in the prefix
(``{dispatcher}``) so every key of one deployment lives in one slot and the scripts work.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
DEFAULT_PREFIX = "dispatcher"


@dataclass(frozen=True)
class Keys:
    """Key names of one deployment (one prefix).

    <prefix>:high|normal|low              list: tasks; producers LPUSH, dispatchers take the right end (FIFO)
    <prefix>:schedule:high|normal|low     sorted set: tasks waiting for a retry or an eta, scored by due ms
    <prefix>:wake                         list: pushed when a task is scheduled, so idle dispatchers re-fetch
    <prefix>:dead                         list: ids of dead letters, newest first
    <prefix>:dead:<id>                    hash: one dead letter (payload unchanged, reason, time, ...)
    <prefix>:result:<task id>             list of one element: the outcome, with a TTL
    <prefix>:dispatchers                  set: ids of dispatchers that may hold tasks
    <prefix>:dispatcher:<id>              string with TTL: heartbeat (JSON: host, pid, procs, started)
    <prefix>:dispatcher:<id>:inflight     hash: slot -> task element, slot:q -> list it came from
    <prefix>:dispatcher:<id>:tokens       list: free worker slots of that dispatcher
    """

    prefix: str = DEFAULT_PREFIX

    def queue(self, priority: str) -> str:
        return f"{self.prefix}:{priority}"

    @functools.cached_property  # read once per fetch
    def queues(self) -> tuple[str, ...]:
        return tuple(self.queue(p) for p in PRIORITIES)

    def schedule(self, priority: str) -> str:
        return f"{self.prefix}:schedule:{priority}"

    @functools.cached_property
    def schedules(self) -> tuple[str, ...]:
        return tuple(self.schedule(p) for p in PRIORITIES)

    @property
    def wake(self) -> str:
        return f"{self.prefix}:wake"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    def dead_entry(self, dead_id: str) -> str:
        return f"{self.prefix}:dead:{dead_id}"

    def result(self, task_id: str) -> str:
        return f"{self.prefix}:result:{task_id}"

    @property
    def dispatchers(self) -> str:
        return f"{self.prefix}:dispatchers"

    def heartbeat(self, dispatcher_id: str) -> str:
        return f"{self.prefix}:dispatcher:{dispatcher_id}"

    def inflight(self, dispatcher_id: str) -> str:
        return f"{self.prefix}:dispatcher:{dispatcher_id}:inflight"

    def tokens(self, dispatcher_id: str) -> str:
        return f"{self.prefix}:dispatcher:{dispatcher_id}:tokens"

    def owns(self, key: str) -> bool:
        """Is this one of the keys above? A producer's reply_to must not be: the reply's EXPIRE
        would put a TTL on a queue or the dead letters. (Other keys under the prefix are fine:
        on Cluster, reply lists need the prefix's hash tag.)"""
        head = self.prefix + ":"
        if not key.startswith(head):
            return False
        rest = key[len(head):]
        return rest in (*PRIORITIES, "wake", "dead", "dispatchers") or rest.startswith(
            ("schedule:", "dead:", "result:", "dispatcher:"))

    def priority_of(self, queue_key: str) -> str:
        """The priority name of a queue key; the queue key itself if it is not one of ours."""
        for priority in PRIORITIES:
            if queue_key == self.queue(priority):
                return priority
        return queue_key
