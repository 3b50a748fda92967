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


#: Flower's events wait at most this long in the worker parent...
AFTER_S = 0.25
#: ... or until this many wait
AT_ONCE = 64


def send_later(dispatcher: Any, timer: Any) -> None:
    """Celery's worker parent buffers task events and sends what it holds at the next turn of
    its event loop (`Consumer.on_send_event_buffered`): with one message fetched per turn that
    is a `PUBLISH`, a round trip to the broker, for nearly every job's message (0.82 a job,
    `inferq bench fleet`). Here the buffer goes out AFTER_S after its first event, or at once
    when AT_ONCE wait, as one `task.multi` message that Flower takes event by event; Flower
    is then up to AFTER_S late. The parent's own events for messages it acknowledges
    (tasks.parent_gate) go through the same buffer."""
    armed = False

    def flush() -> None:
        nonlocal armed
        armed = False
        if not any(dispatcher._group_buffer.values()):
            return  # Celery's flush would publish an empty list per group
        try:
            dispatcher.flush()
        except Exception:  # Flower's view must not stop the worker's consumer
            logger.exception("sending task events to Flower failed")

    def arm() -> None:
        nonlocal armed
        if not armed:
            armed = True
            timer.call_after(AFTER_S, flush)

    dispatcher.buffer_limit = AT_ONCE
    dispatcher.on_send_buffered = arm
