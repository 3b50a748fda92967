"""Webhook shapes: the endpoint objects of `/v1/webhooks`, their deliveries, and the events
sent, in OpenAI's thin form (`{"id": "evt_...", "object": "event", "type", "created_at",
"data": {"id"}}`: the receiver fetches the object itself, so a payload never carries output
that a leaked log or a replaced receiver could read).

Why the event type is decided here, from plain values: the transition script and the batch
finalizer announce *that* an object ended (kind, id, status); what OpenAI calls that end
(`response.incomplete` for a response cut by `max_tokens`, ...) is a rule of the wire
format, tested without a server."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field

from schemas.openai import StrictModel
from schemas.responses import response_id

#: Every event type an endpoint may subscribe to, in the order the docs list them.
EVENT_TYPES: tuple[str, ...] = (
    "batch.completed",
    "batch.failed",
    "batch.expired",
    "batch.cancelled",
    "response.completed",
    "response.failed",
    "response.cancelled",
    "response.incomplete",
    "job.succeeded",
    "job.failed",
    "job.cancelled",
    "job.expired",
)

#: a response job's end status -> its event (succeeded is decided by the result, below)
_RESPONSE_ENDS = {
    "failed": "response.failed",
    "expired": "response.failed",
    "cancelled": "response.cancelled",
}


def finish_reason(result: str | None) -> str | None:
    """Choice 0's `finish_reason` of a job's stored result (a chat.completion as JSON)."""
    if not result:
        return None
    try:
        choices = json.loads(result).get("choices") or []
        reason = choices[0].get("finish_reason")
    except (ValueError, AttributeError, IndexError, TypeError):
        return None
    return reason if isinstance(reason, str) else None


def event_type(kind: str, status: str, result: str | None = None) -> str | None:
    """The event type of an object's end (None: nothing to announce).

    kind: 'job', 'response' or 'batch'; status: the job's or batch's end status; result:
    a response job's result JSON, whose choice 0 ending by `length` makes the response
    `incomplete` rather than `completed` (as OpenAI's `status: incomplete`)."""
    if kind == "job":
        name = f"job.{status}"
    elif kind == "batch":
        name = f"batch.{status}"
    elif kind == "response":
        if status == "succeeded":
            incomplete = finish_reason(result) == "length"
            name = "response.incomplete" if incomplete else "response.completed"
        else:
            name = _RESPONSE_ENDS.get(status, "")
    else:
        return None
    return name if name in EVENT_TYPES else None


def object_id(kind: str, id_: str) -> str:
    """The id a receiver looks the object up by: a response's is `resp_...`, not its job's."""
    return response_id(id_) if kind == "response" else id_


def event_body(event_id: str, type_: str, created_at: int, data_id: str) -> str:
    """The exact bytes posted (and signed) for one event; every retry sends the same."""
    event = {
        "id": event_id,
        "object": "event",
        "type": type_,
        "created_at": created_at,
        "data": {"id": data_id},
    }
    return json.dumps(event, separators=(",", ":"))


class WebhookCreate(StrictModel):
    """Body of POST /v1/webhooks."""

    url: str = Field(description="http(s) URL the events are posted to", max_length=2048)
    events: list[str] | None = Field(
        default=None, description="event types to send; empty or missing: every type"
    )
    all_keys: bool = Field(
        default=False, description="admin keys only: hear of every key's objects, not only this key's"
    )


class WebhookEndpoint(BaseModel):
    """An endpoint as the API shows it; `secret` only in the answers that create or rotate it."""

    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str] = Field(description="subscribed event types; empty: every type")
    created_at: int
    all_keys: bool = False
    #: "api" (POST /v1/webhooks) or "settings" (INFERQ_WEBHOOKS: read-only here)
    source: Literal["api", "settings"] = "api"
    secret: str | None = Field(default=None, description="`whsec_...`: shown on creation and rotation only")


class WebhookList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpoint]


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class DeliveryAttempt(BaseModel):
    """One try: when, what the receiver answered (or why nothing was sent / no answer came)."""

    at: float
    status_code: int | None = None
    error: str | None = None
    duration_ms: int = 0


class WebhookDelivery(BaseModel):
    """One event to one endpoint: `pending` while it has tries left, then `delivered` or `failed`."""

    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    endpoint_id: str
    event_id: str
    event_type: str
    data_id: str
    created_at: int
    status: Literal["pending", "delivered", "failed"]
    attempts: list[DeliveryAttempt]
    next_attempt_at: float | None = None


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDelivery]
    has_more: bool = False
