"""The worker parent's gate (a Celery task strategy and request class): it acknowledges the
messages of jobs a call-mate already ran, and holds back the messages of queued or running
jobs while its child is busy.

Why acknowledge in the parent: a worker child runs up to MAX_BATCH_SIZE jobs per `generate`
call and drains ready jobs from the `ready` lists, so most job messages arrive after their
job finished. Handing each to the child only for it to read a status and skip cost about a
millisecond of the engine's process per job. The parent reads the status instead and, for
a finished job, acknowledges the message and sends the `task-received` / `task-succeeded`
events itself, so every job keeps its task, with its final state, in Flower.

Why hold messages back (prefetch > 1): with one message in flight (prefetch 1, acks late)
the parent could not fetch anything while the child drained the backlog, so every job the
drain ran left its message in the broker; when the drain ended (INFERQ_DRAIN_S) the engine
idled while the parent worked through that pile one message at a time (measured: about a
second idle per five-second drain on the 2-core VM, and the next burst's first call
started half a second late). Now the parent keeps fetching while the child works: finished
jobs' messages are acknowledged at once, the others are held (unacknowledged) and re-read
together every tick; a held job that finishes is acknowledged then, and when the child is
idle the oldest held message goes to it, one at a time.

Why no fast timer: the parent learns that the child is done with a job from Celery itself
(`GateRequest`, the task's request class, runs in the parent when the pool answers), and
only then re-reads the held messages' jobs and hands the next one over. While the child
works, one slow check (`CHECK_S`) acknowledges what finished and gives back queued messages
held too long; a parent that polled every few milliseconds spent a sixth of a core doing so
through every long call, on a machine where each such cycle is taken from the engine.

What holding must not break:
- another worker's work: the child takes its jobs from the shared ready lists, so a
  draining worker runs a job whatever parent holds its message; a *queued* job's message
  held longer than HOLD_QUEUED_S while this child stays busy goes back to the broker if its
  queue there is empty (an idle worker, the one blocked longest on it, takes it; while the
  queue has messages, idle workers have work to wake up with, and giving messages back would
  only make every parent fetch each one again and again through a long backlog);
- crash recovery: a parent holds messages only while its child is busy, that is running a
  job it took into its processing list; if the whole worker dies, its heartbeat lapses, the
  reaper sends that job again and puts back the ids it had taken, and the task that runs
  it drains the ready lists, where the held jobs' ids are again (their messages died with
  the parent: without kombu's ack emulation a fetched message is off the broker, and an
  idle worker sends a message for ready jobs left with none, `Recovery.unwoken`);
- the runner's judgement: anything the parent cannot judge (missing record, Redis
  unreachable) goes the normal way to the child. This is a shortcut, never a second source
  of truth.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery.worker import state as worker_state
from celery.worker.request import Request
from celery.worker.strategy import default

from core import redis_conn
from core.config import get_settings
from core.job_store import JobStore
from schemas.jobs import JobStatus
from tasks import events

logger = logging.getLogger(__name__)

#: while the child is busy, how often held messages are re-read (one pipelined read for all)
CHECK_S = 1.0
#: a queued job's message held this long while the child stays busy goes back to the broker
HOLD_QUEUED_S = 1.0
#: while the child is busy, arriving messages are held unread and their jobs read together
#: once this many came (one round trip for them, not one each: `inferq bench fleet`)
READ_EVERY = 8


def read_facts(store: JobStore, job_ids: list[str]) -> list[dict[str, str]]:
    """The jobs' statuses and what Flower is told of them (tasks.events), in one read; an
    empty dict where missing or unreadable (the child decides those)."""
    try:
        return store.fields_of(job_ids, events.FIELDS)
    except redis.RedisError:
        return [{} for _ in job_ids]


def status_of(facts: dict[str, str]) -> JobStatus | None:
    try:
        return JobStatus(facts["status"])
    except (KeyError, ValueError):
        return None


def child_busy() -> bool:
    """A request of this worker is reserved or running (the pool has one child). Active
    too: a reconnect clears the reserved set while the child may still be running."""
    return bool(worker_state.reserved_requests or worker_state.active_requests)


@dataclass
class _Held:
    job_id: str
    args: tuple[Any, ...]  # (message, body, ack, reject, callbacks) for the default handler
    kw: dict[str, Any]
    since: float


class ParentGate:
    """What the worker parent does with each job message before the pool sees it."""

    def __init__(
        self,
        store: JobStore,
        handler: Callable[..., Any],
        finished: Callable[[str, dict[str, str], Any], None],
        requeue: Callable[[Any], None],
        *,
        busy: Callable[[], bool] = child_busy,
        wake: Callable[[float], None] = lambda delay: None,
        hold_queued_s: float = HOLD_QUEUED_S,
        waiting: Callable[[str], int] = lambda queue: 0,
    ) -> None:
        self.store = store
        self.handler = handler
        self.finished = finished
        #: gives a message back to the broker (its `reject` callable, requeue=True)
        self.requeue = requeue
        self.busy = busy
        #: asks for a `tick` after a delay; called while messages are held (no timer runs
        #: when none are)
        self.wake = wake
        self.hold_queued_s = hold_queued_s
        #: messages waiting in a broker queue (its name: the message's routing key)
        self.waiting = waiting
        self.held: deque[_Held] = deque()
        #: messages held since the last read of the held ones' jobs
        self.unread = 0
        self.closed = False

    def on_message(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        headers = message.headers if isinstance(message.headers, dict) else {}
        job_id = headers.get("id")
        args = (message, body, ack, reject, callbacks)
        if not isinstance(job_id, str):
            return self.handler(*args, **kw)
        if self.held or self.busy():
            # read with the others held, READ_EVERY at a time (or at the next tick)
            self.held.append(_Held(job_id, args, kw, time.monotonic()))
            self.unread += 1
            if self.unread >= READ_EVERY or not self.busy():
                self.tick()
            else:
                self.wake(CHECK_S)
            return None
        facts = read_facts(self.store, [job_id])[0]
        status = status_of(facts)
        if status is not None and status.terminal:
            self.finished(job_id, facts, ack)
        else:
            self.handler(*args, **kw)
        return None

    def tick(self) -> None:
        """Acknowledge held messages whose job finished meanwhile, give back queued ones held
        too long, feed an idle child."""
        if not self.held or self.closed:
            return
        self.unread = 0
        facts = read_facts(self.store, [h.job_id for h in self.held])
        now = time.monotonic()
        busy = self.busy()
        keep: deque[_Held] = deque()
        empty: dict[str, bool] = {}
        for item, fact in zip(self.held, facts, strict=True):
            status = status_of(fact)
            if status is not None and status.terminal:
                self.finished(item.job_id, fact, item.args[2])
            elif status is JobStatus.QUEUED and busy and now - item.since > self.hold_queued_s:
                if self._queue_empty(item, empty):
                    self.requeue(item.args[3])
                    continue
                item.since = now  # others can wake idle workers: ask again in a while
                keep.append(item)
            else:
                keep.append(item)
        self.held = keep
        self.release()

    def _queue_empty(self, item: _Held, seen: dict[str, bool]) -> bool:
        info = getattr(item.args[0], "delivery_info", None) or {}
        queue = str(info.get("routing_key") or "")
        if queue not in seen:
            try:
                seen[queue] = self.waiting(queue) == 0
            except redis.RedisError:
                seen[queue] = False
        return seen[queue]

    def release(self) -> None:
        """An idle child gets the oldest held message (then it is busy again); a tick is
        asked for while any remain."""
        while self.held and not self.closed and not self.busy():
            item = self.held.popleft()
            try:
                self.handler(*item.args, **item.kw)
            except Exception:  # a message the default strategy refuses: dropped (its job id
                # stays in the ready list, for the next drain)
                logger.exception("job %s's message could not be handed to the pool", item.job_id)
        if self.held and not self.closed:
            self.wake(CHECK_S)

    def child_done(self) -> None:
        """The child finished a job: move held messages on now, not at the next check."""
        if self.held and not self.closed:
            self.wake(0.0)

    def close(self) -> None:
        """The consumer restarted: give every held message back (the broker restores any
        that belong to a closed channel); this gate hands nothing more to anyone."""
        self.closed = True
        for item in self.held:
            self.requeue(item.args[3])
        self.held.clear()


def skip_finished(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    handler = default(task, app, consumer, **kwargs)
    eventer = consumer.event_dispatcher
    settings = get_settings()
    client = redis_conn.sync_client(
        settings.redis_url,
        master=settings.redis_sentinel_master,
        decode_responses=True,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )

    send = eventer.send if eventer is not None and eventer.enabled and task.send_events else None
    if eventer is not None and eventer.enabled:
        events.send_later(eventer, consumer.timer)

    def finished(job_id: str, facts: dict[str, str], ack: Any) -> None:
        ack(logger, consumer.connection_errors)
        if send is not None:
            send("task-received", **events.received_fields(task.name, job_id, facts))
            kind, fields = events.final_event(job_id, facts)
            send(kind, **fields)
        logger.debug(
            "job %s is already %s; its message was acknowledged in the parent", job_id, facts["status"]
        )

    def requeue(reject: Any) -> None:
        reject(logger, consumer.connection_errors, True)

    armed: tuple[int, float] | None = None  # (generation, due) of the one tick armed
    generation = 0

    def tick(gen: int) -> None:
        nonlocal armed
        if armed is None or armed[0] != gen:
            return  # a tick that a sooner one replaced
        armed = None
        try:
            gate.tick()
        except Exception:  # raising here would stop the consumer's event loop
            logger.exception("re-reading held job messages failed; retrying")
            wake(CHECK_S)

    def wake(delay: float) -> None:
        """One tick armed at a time: a sooner request replaces the armed one (whose timer
        then finds itself replaced and does nothing), a later one is dropped."""
        nonlocal armed, generation
        due = time.monotonic() + delay
        if armed is not None and armed[1] <= due + 0.001:
            return
        generation += 1
        armed = (generation, due)
        consumer.timer.call_after(delay, tick, (generation,))

    gate = ParentGate(
        JobStore(client, settings.result_ttl_s),
        handler,
        finished,
        requeue,
        wake=wake,
        waiting=lambda queue: int(client.llen(queue)) if queue else 0,
    )
    global _current
    if _current is not None:  # the consumer restarted (reconnect) or reloaded
        _current.close()
    _current = gate
    return gate.on_message


_current: ParentGate | None = None


class GateRequest(Request):  # type: ignore[misc]  # Celery ships no types: Request is Any
    """inferq.run_job's request class. Celery runs its callbacks in the parent when the pool
    answers: with acks late, `acknowledge` once a job succeeded, `on_failure` otherwise."""

    def acknowledge(self) -> None:
        super().acknowledge()
        if _current is not None:
            _current.child_done()

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        try:
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            if _current is not None:
                _current.child_done()
