"""Plain Celery baseline for the queue-floor benchmark: a no-op task on the same broker and
worker settings as inferq (JSON, acks_late, prefetch 1, prefork concurrency 1)."""

from __future__ import annotations

import os

import redis
from celery import Celery

URL = os.environ.get("INFERQ_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("noop", broker=URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_send_task_events=True,
    broker_connection_retry_on_startup=True,
)
_r = redis.Redis.from_url(URL)


@app.task(name="bench.noop")
def noop() -> None:
    _r.incr("inferq:bench:noop")
