"""What Flower is told about a job's task: its own run time, and an end that says how the
job ended.

Why: a task often runs a whole engine call, or drains several, and the messages of its
call-mates are acknowledged in the parent without running at all (tasks.parent_gate). Celery's
own events would show the drain's length for the first and 0 ms for the others, and a
cancelled or failed job as a green success. These events come from the job record instead:
its start and end, and its status as Celery's success, failure or revocation."""

from __future__ import annotations

import logging
from typing import Any, cast

import redis
from celery.events.event import Event
from celery.utils.time import utcoffset

from core import keys

logger = logging.getLogger(__name__)

#: the record fields Flower is told of (the worker parent reads them with the status)
FIELDS = ("model", "queue", "started_at", "finished_at", "error", "status")


def job_facts(client: redis.Redis, job_id: str) -> dict[str, str]:
    values = cast(list[str | None], client.hmget(keys.job(job_id), FIELDS))
    return {k: v for k, v in zip(FIELDS, values, strict=True) if v}


def kwargs_repr(model: str, lane: str) -> str:
    """A job message's kwargs as Flower shows them (the task itself takes only the id)."""
    return repr({"model": model, "lane": lane})


def received_fields(name: str, job_id: str, facts: dict[str, str]) -> dict[str, Any]:
    """task-received: the job id as the argument, its model and lane as keyword arguments."""
    kwargs = kwargs_repr(facts.get("model", ""), facts.get("queue", ""))
    return {"uuid": job_id, "name": name, "args": repr([job_id]), "kwargs": kwargs}


def final_event(job_id: str, facts: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """The event that ends the task in Flower, and its fields."""
    status = facts.get("status", "")
    started, ended = facts.get("started_at"), facts.get("finished_at")
    runtime = float(ended) - float(started) if started and ended else 0.0
    if status == "succeeded":
        return "task-succeeded", {"uuid": job_id, "result": repr(status), "runtime": runtime}
    if status in ("cancelled", "expired"):
        return "task-revoked", {"uuid": job_id, "terminated": False, "expired": status == "expired"}
    return "task-failed", {
        "uuid": job_id,
        "exception": f"job {status or 'missing'}: {facts.get('error', '')}",
        "traceback": "",
        "runtime": runtime,
    }


class Outbox:
    """Flower's events of the messages the worker parent acknowledges, sent together as one
    message, as Celery's own dispatcher sends a buffered group (`task.multi`, a list that
    Flower's receiver takes event by event): at once when AT_ONCE wait, else AFTER_S after
    the first. Why: two events for each acknowledged message, one PUBLISH each, were a round
    trip to the broker per event (`inferq bench fleet`). `dispatcher` None: events are off."""

    AT_ONCE = 64
    AFTER_S = 0.25

    def __init__(self, dispatcher: Any, timer: Any) -> None:
        self.dispatcher = dispatcher
        self.timer = timer
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.armed = False

    def add(self, kind: str, fields: dict[str, Any]) -> None:
        if self.dispatcher is not None:
            self.events.append((kind, fields))

    def settle(self) -> None:
        """After a batch of messages: publish now if many wait, else arm one timer."""
        if len(self.events) >= self.AT_ONCE:
            self.publish()
        elif self.events and not self.armed:
            self.armed = True
            self.timer.call_after(self.AFTER_S, self.publish)

    def publish(self) -> None:
        self.armed = False
        if not self.events:
            return
        d = self.dispatcher
        batch = [
            Event(
                kind, hostname=d.hostname, utcoffset=utcoffset(), pid=d.pid, clock=d.clock.forward(), **fields
            )
            for kind, fields in self.events
        ]
        self.events.clear()
        try:
            with d.mutex:
                d._publish(batch, d.producer, "task.multi")
        except Exception:  # Flower's view must not stop the worker's consumer
            logger.exception("sending %d events to Flower failed", len(batch))
