"""A Celery task strategy that acknowledges, in the worker parent, the messages of jobs a
batch-mate already ran.

Why: a worker child runs up to MAX_BATCH_SIZE jobs per `generate` call, so most job
messages arrive after their job finished. Handing each to the child only for it to read a
status and skip cost about a millisecond of the child's time per job (the engine's
process): several percent of a fast engine's throughput. The parent reads the status
instead and, for a finished job, acknowledges the message and sends the `task-received` /
`task-succeeded` events itself, so every job keeps its task, with its final state, in
Flower. Anything else (queued, running, missing, Redis unreachable) goes the normal way to
the child, whose runner decides as before: this is a shortcut, never a second source of
truth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from celery.worker.strategy import default

from core.config import get_settings
from core.jobs import JobStore
from schemas.jobs import JobStatus

logger = logging.getLogger(__name__)


def finished_status(store: JobStore, job_id: str) -> JobStatus | None:
    """The job's terminal status, or None if it is not finished (or cannot be read)."""
    try:
        status = store.status(job_id)
    except redis.RedisError:
        return None
    return status if status is not None and status.terminal else None


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
    store = JobStore(client, settings.result_ttl_s)

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        headers = message.headers if isinstance(message.headers, dict) else {}
        job_id = headers.get("id")
        status = finished_status(store, job_id) if isinstance(job_id, str) else None
        if status is None:
            return handler(message, body, ack, reject, callbacks, **kw)
        ack(logger, consumer.connection_errors)
        if send is not None:
            send("task-received", uuid=job_id, name=task.name, args=headers.get("argsrepr", ""), kwargs="{}")
            send("task-succeeded", uuid=job_id, result=repr(status.value), runtime=0.0)
        logger.debug("job %s is already %s; its message was acknowledged in the parent", job_id, status)
        return None

    return on_message
