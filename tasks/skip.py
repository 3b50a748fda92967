"""A Celery task strategy: the worker parent acknowledges the messages of jobs a batch-mate
already ran, and holds back the messages of queued or running jobs while its child is busy.

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
second idle per five-second drain on the 2-core VM, and the next burst's first batch
started half a second late). Now the parent keeps fetching while the child works: finished
jobs' messages are acknowledged at once, the others are held (unacknowledged: crash-safe
like any reserved message) and re-read together every tick; a held job that finishes is
acknowledged then, and when the child is idle the oldest held message goes to it, one at a
time, so no job waits in this parent's pool while its child is busy (another worker's drain
can take it from the ready list). Anything the parent cannot judge (missing record, Redis
unreachable) goes the normal way to the child, whose runner stays the only judge: this is a
shortcut, never a second source of truth.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from celery.worker import state as worker_state
from celery.worker.strategy import default

from core.config import get_settings
from core.jobs import JobStore
from schemas.jobs import JobStatus

logger = logging.getLogger(__name__)

#: how often held messages are re-read (one pipelined read for all of them)
TICK_S = 0.02


def read_statuses(store: JobStore, job_ids: list[str]) -> list[JobStatus | None]:
    """The jobs' statuses; None where missing or unreadable (the child decides those)."""
    try:
        return store.statuses(job_ids)
    except redis.RedisError:
        return [None] * len(job_ids)


def child_busy() -> bool:
    """A request of this worker is reserved or running (the pool has one child)."""
    return bool(worker_state.reserved_requests)


@dataclass
class _Held:
    job_id: str
    args: tuple[Any, ...]  # (message, body, ack, reject, callbacks) for the default handler
    kw: dict[str, Any]


class ParentGate:
    """What the worker parent does with each job message before the pool sees it."""

    def __init__(
        self,
        store: JobStore,
        handler: Callable[..., Any],
        finished: Callable[[str, JobStatus, Any], None],
        busy: Callable[[], bool] = child_busy,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.handler = handler
        self.finished = finished
        self.busy = busy
        #: asks for a `tick` soon; called while messages are held (no timer runs when none are)
        self.wake = wake
        self.held: deque[_Held] = deque()
        self.closed = False

    def close(self) -> None:
        """The consumer restarted: held messages belong to a closed channel (the broker
        restores them); this gate hands nothing more to anyone."""
        self.closed = True
        self.held.clear()

    def on_message(self, message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        headers = message.headers if isinstance(message.headers, dict) else {}
        job_id = headers.get("id")
        args = (message, body, ack, reject, callbacks)
        if not isinstance(job_id, str):
            return self.handler(*args, **kw)
        status = read_statuses(self.store, [job_id])[0]
        if status is not None and status.terminal:
            self.finished(job_id, status, ack)
        elif status in (JobStatus.QUEUED, JobStatus.RUNNING) and (self.held or self.busy()):
            self.held.append(_Held(job_id, args, kw))
            self.release()
            if self.held:
                self.wake()
        else:
            self.handler(*args, **kw)
        return None

    def tick(self) -> None:
        """Acknowledge held messages whose job finished meanwhile; feed an idle child."""
        if not self.held or self.closed:
            return
        held = list(self.held)
        self.held.clear()
        for item, status in zip(held, read_statuses(self.store, [h.job_id for h in held]), strict=True):
            if status is not None and status.terminal:
                self.finished(item.job_id, status, item.args[2])
            else:
                self.held.append(item)
        self.release()
        if self.held:
            self.wake()

    def release(self) -> None:
        """An idle child gets the oldest held message (then it is busy again)."""
        while self.held and not self.closed and not self.busy():
            item = self.held.popleft()
            self.handler(*item.args, **item.kw)


def skip_finished(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    handler = default(task, app, consumer, **kwargs)
    eventer = consumer.event_dispatcher
    send = eventer.send if eventer is not None and eventer.enabled and task.send_events else None
    settings = get_settings()
    client = redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )

    def finished(job_id: str, status: JobStatus, ack: Any) -> None:
        ack(logger, consumer.connection_errors)
        if send is not None:
            send("task-received", uuid=job_id, name=task.name, args=repr([job_id]), kwargs="{}")
            send("task-succeeded", uuid=job_id, result=repr(status.value), runtime=0.0)
        logger.debug("job %s is already %s; its message was acknowledged in the parent", job_id, status)

    armed = False

    def tick() -> None:
        nonlocal armed
        armed = False
        try:
            gate.tick()
        except Exception:  # raising here would stop the consumer's event loop
            logger.exception("re-reading held job messages failed; retrying")
            gate.wake()

    def wake() -> None:
        nonlocal armed
        if not armed:
            armed = True
            consumer.timer.call_after(TICK_S, tick)

    gate = ParentGate(JobStore(client, settings.result_ttl_s), handler, finished, wake=wake)
    global _current
    if _current is not None:  # the consumer restarted (reconnect)
        _current.close()
    _current = gate
    return gate.on_message


_current: ParentGate | None = None
