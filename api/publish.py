"""Enqueue Celery task messages with the async Redis client, in the same round trip as the
job record.

Why: Celery's `send_task` is blocking and takes a pooled connection per call; from the API's
threads it capped ingest at ~140 requests/s on two cores. The message is built exactly as
kombu's Redis transport builds it (Celery protocol 2, JSON body, base64 transport encoding,
LPUSH onto the queue's list; each lane has its own direct exchange bound to one queue), so
the worker cannot tell the difference. Only Celery's optional `task-sent` event is not
emitted; Flower still sees every task from the worker's events.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from celery import Celery

from tasks.events import kwargs_repr


def task_message(app: Celery, task_name: str, job_id: str, queue: str, model: str = "") -> str:
    """One JSON-serialized kombu envelope for `task_name(job_id)` on `queue`. Its kwargs as
    Flower shows them name the job's model and lane (the task itself takes only the id)."""
    msg = app.amqp.as_task_v2(
        job_id, task_name, args=[job_id], kwargs={}, kwargsrepr=kwargs_repr(model, queue)
    )
    body = json.dumps(msg.body).encode("utf-8")
    properties: dict[str, Any] = dict(msg.properties)
    properties.update(
        body_encoding="base64",
        delivery_tag=str(uuid.uuid4()),
        delivery_mode=2,
        priority=0,
        delivery_info={"exchange": queue, "routing_key": queue},
    )
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": msg.headers,
        "properties": properties,
    }
    return json.dumps(envelope)
