"""The dispatcher: the loop that moves tasks from Redis to worker children and outcomes back.

One thread (the caller's) owns the hot path: it writes outcomes and fetches tasks, a batch per
round trip. Pool threads only append finished jobs to an in-memory outbox and wake the loop, so a
callback can never raise into the pool or block on Redis. The loop takes a task only for a free
slot (token); there is one slot per child, plus --prefetch slots whose tasks wait in the pool's
queue for whichever child frees first (a high task passes them: ``dispatcher.urgent``). A
child only ever takes a task when it is idle, so no child is ever handed a second task --
except that, with --prefetch, tasks seen to run for under half of --batch-budget (1 ms by
default) may go to the pool in small batches (``dispatcher.batching``).
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis

from dispatcher import outcomes
from dispatcher.batching import Batcher
from dispatcher.codec import Task, decode
from dispatcher.errors import BrokenKey, InvalidTask, LostId, UnpackableItems
from dispatcher.execute import init_child, run
from dispatcher.heartbeat import Heartbeat, claim_id
from dispatcher.incidents import BACKOFF_MAX, Incidents
from dispatcher.registry import Registry, TaskSpec
from dispatcher.settings import Settings
from dispatcher.store import REDIS_DOWN, Fetched, Store
from dispatcher.urgent import HighLane, Lookout, Peek, YieldedToHighTask
from dispatcher.waiters import Waiters, Wakeup
from dispatcher.warmup import WarmUp
from worker_pool import Call, JobEnd, NotStarted, WorkerPool

logger = logging.getLogger(__name__)

IDLE_WAIT = 30.0      # safety net only: pushes and new schedules wake an idle loop at once
SIGNAL_CHECK = 0.25   # signal handlers only set a flag; the loop looks at least this often
LAPSED = -3           # fetch.lua: our heartbeat is missing
# How a task that never started ends: its batch's child was lost with the pool closing, or it
# was handed back for a high task
NEVER_RAN = (NotStarted.__name__, YieldedToHighTask.__name__)


@dataclass
class Running:
    task: Task
    spec: TaskSpec
    fetched: Fetched


@dataclass
class Counters:
    completed: int = 0
    failed: int = 0
    retried: int = 0
    dead: int = 0
    requeued: int = 0
    yielded: int = 0

    def summary(self) -> str:
        return (f"{self.completed} completed, {self.failed} failed, {self.retried} retried, "
                f"{self.dead} dead-lettered, {self.requeued} put back, "
                f"{self.yielded} handed back for high tasks")


class Dispatcher:
    def __init__(self, settings: Settings, client: redis.Redis, store: Store, registry: Registry) -> None:
        self.settings = settings
        self.client = client
        self.store = store
        self.registry = registry
        self.policy = outcomes.Policy(settings.max_retries, settings.retry_backoff,
                                      settings.retry_backoff_max, settings.result_ttl)
        self.id = ""
        self.counters = Counters()
        self._running: dict[int, Running] = {}
        self._pending: list[dict[str, Any]] = []   # finish items not yet written to Redis
        self._outbox: collections.deque[JobEnd] = collections.deque()
        self._wakeup = Wakeup()   # set by pool threads, signals and stop(); the loop sleeps on it
        self._signals = 0              # incremented by the signal handlers, nothing else
        self._signals_acted_on = 0     # how many of them the loop has already acted on
        self._incidents = Incidents()
        self._lost: LostId | None = None  # set once another process holds our id: we stop
        self._lapsed = False  # our heartbeat lapsed: the next reconcile must not restore entries
        self._needs_reconcile = False
        self._pool: WorkerPool | None = None
        self._warm_up: WarmUp | None = None  # until the children are ready (dispatcher.warmup)
        self._batcher = Batcher(settings.procs, settings.batch_budget)
        self._waiters = Waiters(client, [*store.keys.queues, store.keys.wake], self._wakeup)
        self._heartbeat: Heartbeat | None = None
        # High tasks first, past tasks already in the pool's queue (dispatcher.urgent)
        self._context = multiprocessing.get_context(settings.start_method)
        self._lane = HighLane(self._context, settings.slots, settings.procs, store.keys.queue("high"),
                              on=bool(settings.prefetch))

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> bool:
        """Register in Redis (waiting for it if need be), then start workers; False if stopped first."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace(),
                "procs": self.settings.procs, "started": outcomes.iso(time.time())}
        while not self._register(info):
            if self._signals:
                return False
            self._sleep(self._incidents.delay)
        self._incidents.redis_back()
        self._start_workers(info)
        return True

    def _register(self, info: dict[str, Any]) -> bool:
        """Claim an id, put back what a previous life left in flight, reset the tokens."""
        ttl_ms = int(self.settings.heartbeat_ttl * 1000)
        try:
            self.id = self.settings.name or claim_id(self.store, info["host"], info, ttl_ms)
            if self.settings.name:
                self.store.take_over(self.id, info, ttl_ms)
            requeued = self.store.reconcile(self.id, self.settings.slots)
        except redis.AuthenticationError:  # at the start it is a setting to fix: say so, and exit
            raise
        except BrokenKey as exc:  # a list its last life's tasks go back to: wait for a person
            self._incidents.broken_key(exc)
            self._sleep(BACKOFF_MAX)
            return False
        except REDIS_DOWN as exc:
            self._redis_down(exc)
            return False
        if requeued:
            logger.warning("put back %d task(s) this dispatcher (%s) held when it last stopped",
                           requeued, self.id)
        return True

    def _start_workers(self, info: dict[str, Any]) -> None:
        self._pool = WorkerPool(self.settings.procs, initializer=init_child,
                                initargs=(self.settings.task_modules, self._lookout()),
                                start_method=self.settings.start_method,
                                kill_grace=self.settings.kill_grace)
        self._warm_up = WarmUp(self._pool, self.settings.procs, self._wakeup.set)
        self._heartbeat = Heartbeat(self.store, self.id, info, self.settings.heartbeat_ttl, self._lose_id,
                                    self._heartbeat_lapsed)
        self._heartbeat.beat_once()  # also puts back the tasks of peers that died while we were away
        self._heartbeat.start()

    def _lookout(self) -> Lookout | None:
        """What each child looks at before a task that is not high. None without a prefetch: no
        task waits in the pool to be passed then, so nothing is ever handed back."""
        if not self.settings.prefetch:
            return None
        return Lookout(self._lane.bar, Peek(self.client, self.store.keys.queue("high")))

    def install_signal_handlers(self) -> None:
        def record(signum: int, frame: Any) -> None:
            self._signals += 1
            self._wakeup.set()
        signal.signal(signal.SIGINT, record)
        signal.signal(signal.SIGTERM, record)

    def run(self) -> int:
        """Serve until a signal (or stop()); returns the process exit code."""
        if not self.start():
            logger.info("stopped before Redis could be reached")
            return 0
        try:
            while not self._signals:
                self.step()
            if self._lost is None:
                logger.info("stop requested: no new tasks; waiting up to %.0fs for %d running task(s) "
                            "(signal again to skip the wait)", self.settings.grace, len(self._running))
        finally:
            self.shutdown()
        return 0 if self._lost is None else 1

    def stop(self) -> None:
        """Ask run() to stop, as a signal would (for embedding and tests)."""
        self._signals += 1
        self._wakeup.set()

    # -- the loop --------------------------------------------------------------------------------

    def step(self, fetch: bool = True) -> None:
        """One turn: record finished tasks, take new ones for free slots, then wait to be woken."""
        self._wakeup.clear()
        self._collect()
        try:
            if self._needs_reconcile or not fetch:
                self._flush()
            if self._needs_reconcile:
                self._reconcile()
            timeout = self._fill() if fetch else SIGNAL_CHECK
        except REDIS_DOWN as exc:
            timeout = self._redis_down(exc)
        except UnpackableItems as exc:
            self._park_unpackable(exc)
            timeout = 0
        except BrokenKey as exc:
            self._lane.give_up()
            self._incidents.broken_key(exc)
            timeout = BACKOFF_MAX
        except LostId as exc:
            self._lose_id(exc)
            return
        except Exception:  # the loop's edge: log, back off, resync with Redis, go on
            logger.exception("dispatcher loop error; retrying after a pause")
            self._needs_reconcile = True
            self._lane.give_up()  # no fetch takes a high task meanwhile: let the children run
            timeout = BACKOFF_MAX
        else:
            self._incidents.redis_back()
        self._sleep(timeout)

    def _heartbeat_lapsed(self) -> None:
        """From the heartbeat thread: we were away past the TTL and took our id back. A peer may
        have put our tasks back meanwhile: reconcile, without writing their entries again."""
        self._lapsed = True
        self._needs_reconcile = True
        self._wakeup.set()

    def _lose_id(self, exc: LostId) -> None:
        """Another process holds our id (from the loop, or the heartbeat thread): stop at once.
        Our running tasks were put back when our heartbeat lapsed and run there, or will; a
        result of ours written now could only land in its records."""
        if self._lost is None:
            self._lost = exc
            logger.error("dispatcher id %s is now held by another process (its heartbeat: %s): this "
                         "one lost it, cut off from Redis or paused for over %.0fs. Its %d running "
                         "task(s) were put back then and may run twice. Stopping at once, without "
                         "writing to %s's records; start it again to get an id of its own",
                         self.id, exc, self.settings.heartbeat_ttl, len(self._running), self.id)
        self._signals += 1
        self._wakeup.set()

    def _sleep(self, timeout: float) -> None:
        """Wait for a wake-up (a push, a finished task), a signal, or the timeout."""
        deadline = time.monotonic() + timeout
        while not self._wakeup.is_set() and self._signals == self._signals_acted_on:
            left = deadline - time.monotonic()
            if left <= 0 or self._waiters.wait(min(left, SIGNAL_CHECK)):
                return

    def _fill(self) -> float:
        """Write pending outcomes and, once ``refill_at`` slots are free, fetch for them, in one
        round trip.

        Returns how long the loop may sleep (0: go again now). Slots of pending outcomes count
        as free: the same round trip gives their tokens back before the fetch runs. While the
        bar is up (a high task was pushed), it fetches high tasks only, for any free slot.
        """
        if self._warm_up is not None:
            wait = self._warm_up.check()
            if wait is not None:
                return wait  # a warm-up's end wakes us
            self._warm_up = None
            logger.info("dispatcher %s ready: %d worker(s), heartbeat ttl %.0fs",
                        self.id, self.settings.procs, self.settings.heartbeat_ttl)
        free = self.settings.slots - len(self._running)
        raised = self._lane.raised
        if free < (1 if raised else self.settings.refill_at):  # a finishing task wakes us
            self._flush()
            return IDLE_WAIT
        most = min(free, self.settings.batch)
        got = self.store.finish_and_fetch(self.id, self._pending, most, lists=1 if raised else 3)
        self._pending = []
        self._incidents.key_ok()
        if got == LAPSED:  # our heartbeat is missing: take it back (or learn that it is lost)
            return 0 if self._heartbeat.beat_once() else SIGNAL_CHECK
        if isinstance(got, int) and raised:  # no high task left there
            self._lane.give_up()
            if got != -2:
                return 0  # fetch the others now
        if isinstance(got, int):
            if got == -2:
                logger.warning("Redis holds no free token for %d free slot(s); reconciling", free)
                self._needs_reconcile = True
                return SIGNAL_CHECK
            self._waiters.arm()
            return IDLE_WAIT if got < 0 else min(IDLE_WAIT, max(got / 1000, 0.001))
        now = time.time()
        self._submit([ready for fetched in got if (ready := self._prepare(fetched, now))])
        self._lane.after_fetch(raised, len(got), most)
        # Come back at once only for work: another fetch (a short one means the lists may be
        # empty, and the next arms the waiters) or outcomes to write (dead letters). A job that
        # ends meanwhile wakes the loop anyway.
        free = self.settings.slots - len(self._running)
        return 0 if free >= self.settings.refill_at or self._pending else IDLE_WAIT

    def _prepare(self, fetched: Fetched, now: float) -> tuple[Call, str, float | None, bool] | None:
        """Decode and check a fetched task, and record it as running: (its call, its name, its
        hard time limit, whether it is high). A task that cannot run is parked as a dead letter
        instead (None)."""
        task = None
        try:
            task = decode(fetched.element, max_size=self.settings.max_size)
            if task.reply_to and self.store.keys.owns(task.reply_to):
                raise InvalidTask(f"field 'reply_to' names one of the dispatcher's own keys: {task.reply_to!r}")
            spec = self.registry.get(task.name)
            kwargs = dict(task.kwargs)
            spec.check_call(task.args, kwargs)
        except Exception as exc:  # InvalidTask, or a decoder surprise: either way park it, never loop on it
            reason = str(exc) if isinstance(exc, InvalidTask) else f"cannot decode element: {exc!r}"
            logger.warning("dead letter: element from %s is not a runnable task: %s", fetched.queue, reason)
            self._lane.fetched(fetched.queue)
            self._pending.append(self._refused(fetched.slot, task, exc, reason, now))
            self.counters.dead += 1
            return None
        self._running[fetched.slot] = Running(task, spec, fetched)
        logger.debug("start %s %s slot=%d attempt=%d", task.name, task.id, fetched.slot, task.attempt)
        high = self._lane.mark(fetched.slot, fetched.queue, len(self._running))
        call = Call(fetched.slot, run,
                    (task.name, task.args, kwargs, task.id, task.codec,
                     bool(task.want_result or task.reply_to), high),
                    None, _first(task.soft_time_limit, spec.soft_time_limit, self.settings.soft_time_limit))
        time_limit = _first(task.time_limit, spec.time_limit, self.settings.time_limit)
        return call, task.name, time_limit, high != 0

    def _refused(self, slot: int, task: Task | None, exc: Exception, reason: str, now: float) -> dict[str, Any]:
        """The dead letter of an element that cannot run; with the reason sent to whoever waits
        for its outcome, when it decoded far enough to say who that is."""
        if task is not None:
            error_type = type(exc).__name__ if isinstance(exc, InvalidTask) else InvalidTask.__name__
            try:
                return outcomes.refused_item(slot, task, error_type, reason, self.store.keys, self.policy, now)
            except Exception:  # noqa: BLE001 -- the reply cannot be encoded: park it without one
                logger.debug("no reply for refused task %s", task.id, exc_info=True)
        return outcomes.invalid_item(slot, reason, self.store.keys, now)

    def _submit(self, ready: list[tuple[Call, str, float | None, bool]]) -> None:
        """Hand the tasks to the pool in fetch (priority) order: one job each, or short ones
        together in batches as ``self._batcher`` allows. (Children take jobs in that order; a
        child that ends its batch early may start a later one before another child's batch ends.)"""
        batch: list[Call] = []
        room = 0
        for call, name, time_limit, high in ready:
            # A high task goes alone: started as soon as taken, so no task behind it starts
            # first on another child (dispatcher.urgent)
            size = 1 if time_limit is not None or high else self._batcher.size(name, len(ready))
            if batch and (size < 2 or len(batch) >= min(room, size)):
                self._submit_batch(batch)
                batch = []
            if size < 2:
                self._submit_batch([call], time_limit)
                continue
            room = min(room, size) if batch else size
            batch.append(call)
        self._submit_batch(batch)

    def _submit_batch(self, batch: list[Call], time_limit: float | None = None) -> None:
        """A batch of one goes as a plain job: the only kind a hard time limit can apply to."""
        try:
            if len(batch) == 1:
                call = batch[0]
                self._pool.submit(call.key, call.fn, call.args, on_end=self._on_end,
                                  time_limit=time_limit, soft_time_limit=call.soft_time_limit)
            elif batch:
                logger.debug("batch of %d: slots %s", len(batch), [call.key for call in batch])
                self._pool.submit_batch(batch, on_end=self._on_end)
        except Exception as exc:  # a bug: bad input is refused before this. Park, never strand a slot
            logger.exception("could not hand %d task(s) to the worker pool: dead letters", len(batch))
            now = time.time()
            for call in batch:
                self._running.pop(call.key, None)
                self._lane.ended(call.key)
                self._pending.append(outcomes.invalid_item(
                    call.key, f"could not be handed to the worker pool: {exc!r}", self.store.keys, now))
                self.counters.dead += 1

    def _on_end(self, end: JobEnd) -> None:
        """Runs in a pool thread: hand the end to the loop. Nothing here can raise."""
        self._outbox.append(end)
        self._wakeup.set()

    def _collect(self) -> None:
        put_back: list[dict[str, Any]] = []
        while self._outbox:
            end = self._outbox.popleft()
            now = time.time()
            running = self._running.pop(end.key, None)
            if running is None:
                logger.error("job end for unknown slot %r ignored", end.key)
                continue
            self._lane.ended(end.key)
            if end.error_type in NEVER_RAN:  # back to the head of its list, no attempt counted
                if end.error_type == NotStarted.__name__:  # its batch's child was lost, the pool closing
                    self.counters.requeued += 1
                else:                                      # handed back: a high task waits
                    self.counters.yielded += 1
                    self._lane.handed_back()
                    logger.debug("handed back %s %s for a high task", running.task.name, running.task.id)
                put_back.append(outcomes.requeue_item(end.key))
                continue
            self._batcher.observe(running.task.name, end.duration)
            try:
                item = self._item_for(running, end, now)
            except Exception as exc:  # never lose the task or the slot over a bug in one outcome
                if isinstance(exc, (UnicodeEncodeError, OverflowError)):  # the producer's data, not a bug
                    logger.warning("dead letter: the outcome of %s %s could not be recorded: %r",
                                   running.task.name, running.task.id, exc)
                else:
                    logger.exception("could not record the outcome of %s %s", running.task.name, running.task.id)
                item = outcomes.invalid_item(running.fetched.slot, f"outcome could not be recorded: {exc!r}",
                                             self.store.keys, now)
            self._pending.append(item)
        self._pending.extend(reversed(put_back))  # newest first, as in shutdown()

    def _item_for(self, running: Running, end: JobEnd, now: float) -> dict[str, Any]:
        task, slot = running.task, running.fetched.slot
        if end.ok:
            self.counters.completed += 1
            logger.debug("done %s %s in %.3fs", task.name, task.id, now - (end.started or now))
            return outcomes.ack_item(slot, task, end.value, self.store.keys, self.policy)
        self.counters.failed += 1
        max_retries = _first(task.max_retries, running.spec.max_retries, self.settings.max_retries)
        item = outcomes.failure_item(slot, task, running.fetched.queue,
                                     (end.error_type, end.error_message, end.traceback),
                                     max_retries, self.store.keys, self.policy, now)
        will_retry = item["action"] == "retry"
        self.counters.retried += will_retry
        self.counters.dead += not will_retry
        logger.warning("task %s %s failed (attempt %d): %s: %s; %s", task.name, task.id,
                       task.attempt + 1, end.error_type, end.error_message,
                       "will retry" if will_retry else "no retries left: dead letter")
        return item

    def _flush(self) -> None:
        """Write pending outcomes without fetching (on the hot path's connection)."""
        if self._pending:
            self.store.finish_and_fetch(self.id, self._pending, 0)
            self._pending = []

    def _park_unpackable(self, exc: UnpackableItems) -> None:
        """Outcomes Redis cannot be sent (a task id or an error message that is not valid
        Unicode, say): each task is parked as a dead letter instead, with the reason, and the
        other outcomes go at the next turn."""
        now = time.time()
        for index in exc.bad:
            slot = self._pending[index]["slot"]
            logger.warning("dead letter: the outcome of the task in slot %s could not be recorded: %s",
                           slot, exc.why)
            self._pending[index] = outcomes.invalid_item(
                slot, f"its outcome could not be recorded: {exc.why}", self.store.keys, now)

    def _reconcile(self) -> None:
        known = [(slot, r.fetched.queue, r.fetched.element) for slot, r in self._running.items()]
        lapsed, self._lapsed = self._lapsed, False  # set again meanwhile by the heartbeat: again
        self._needs_reconcile = False
        try:
            requeued = self.store.reconcile(self.id, self.settings.slots, known, lapsed=lapsed)
        except BaseException:
            self._lapsed = self._lapsed or lapsed
            self._needs_reconcile = True
            raise
        if requeued:
            logger.warning("reconciled with Redis: put back %d task(s) this dispatcher no longer holds",
                           requeued)

    # -- Redis outages ---------------------------------------------------------------------------

    def _redis_down(self, exc: Exception) -> float:
        self._needs_reconcile = True
        self._lane.give_up()
        return self._incidents.redis_down(exc, len(self._running), len(self._pending))

    # -- shutdown --------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Let running tasks finish until the grace deadline (or a second signal), put the rest back."""
        self._signals_acted_on = signals_at_stop = max(self._signals, 1)
        self._waiters.close()
        if self._pool is None:
            self._wakeup.close()
            return
        if self._lost is None:
            self._pool.close()
            deadline = time.monotonic() + self.settings.grace
            while (self._running and time.monotonic() < deadline and self._signals <= signals_at_stop
                   and self._lost is None):
                self.step(fetch=False)
        self._pool.terminate()
        if self._lost is not None:  # nothing more may be written: what runs is another's now
            if self._heartbeat:
                self._heartbeat.stop()
            self._wakeup.close()
            logger.warning("dispatcher %s stopped: it lost its id; %d running task(s) stopped unrecorded",
                           self.id, len(self._running))
            return
        self._collect()
        # Newest first: each goes back to the consuming end of its list, so the oldest lands last
        # and is taken first again.
        for slot in reversed(list(self._running)):
            self._pending.append(outcomes.requeue_item(slot))
            self.counters.requeued += 1
            del self._running[slot]
        if self._heartbeat:  # first: a beat would bring back the heartbeat the final write drops
            self._heartbeat.stop()
            self._heartbeat.join(timeout=5)
        self._final_write()
        self._wakeup.close()
        logger.info("dispatcher %s stopped: %s", self.id, self.counters.summary())

    def _final_write(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self._flush()
                orphans = self.store.forget(self.id)
                if orphans:
                    logger.warning("put back %d task(s) Redis held for %s but it did not run", orphans, self.id)
                return
            except UnpackableItems as exc:
                self._park_unpackable(exc)
            except LostId as exc:
                self._lose_id(exc)
                return
            except REDIS_DOWN as exc:
                if time.monotonic() > deadline:
                    what = (f"write {len(self._pending)} outcome(s)" if self._pending
                            else f"clear the record of {self.id}")
                    logger.error("could not %s before exit (%s); the next start of %s, or a peer once "
                                 "its heartbeat expires, puts back what it held", what, exc, self.id)
                    return
                time.sleep(0.2)


def _first(task_value: Any, spec_value: Any, default: Any) -> Any:
    """The task's own setting, else its decorator's, else the dispatcher's (twice per task)."""
    if task_value is not None:
        return task_value
    return spec_value if spec_value is not None else default


def _pid_namespace() -> str | None:
    """Which pids this process sees (Linux): a restart on the same host takes over its dead
    predecessor's id only if it sees the same pids, so containers that share a host name never
    take each other's."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
