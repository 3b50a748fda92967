"""Webhook endpoints per API key: `/v1/webhooks` (create, list, get, delete, rotate the
secret) and each endpoint's delivery attempts. Sending is api.webhooks'.

Who sees what: a key its own endpoints; an admin key (INFERQ_ADMIN_KEYS) every key's, and
may make one with `all_keys: true` that hears of every key's objects; without keys, every
caller all of them. Endpoints from INFERQ_WEBHOOKS are listed to admins (and keyless
callers) and are changed in the settings only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from api import webhook_guard as guard
from api.auth import OwnerDep, bearer_token
from api.deps import StateDep
from api.errors import APIError, error_responses
from api.webhooks import WebhookDispatcher
from core.auth import configured_hashes, hash_key
from core.webhooks import Endpoint, bad_events
from schemas.webhooks import (
    EVENT_TYPES,
    WebhookCreate,
    WebhookDeleted,
    WebhookDeliveryList,
    WebhookEndpoint,
    WebhookList,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class Caller:
    """The caller as the webhook routes see it: its owner id and whether it sees every key's."""

    def __init__(self, owner: str, sees_all: bool) -> None:
        self.owner, self.sees_all = owner, sees_all

    def may(self, ep: Endpoint) -> bool:
        if self.sees_all:
            return True
        return ep.source != "settings" and ep.owner == self.owner


async def current_caller(request: Request, st: StateDep, owner: OwnerDep) -> Caller:
    if not st.settings.auth_enabled:
        return Caller(owner, True)
    token = bearer_token(request)
    return Caller(owner, bool(token) and hash_key(token) in configured_hashes(st.settings.admin_keys))


async def dispatcher(request: Request) -> WebhookDispatcher:
    found: WebhookDispatcher = request.app.state.webhooks
    return found


CallerDep = Annotated[Caller, Depends(current_caller)]
HooksDep = Annotated[WebhookDispatcher, Depends(dispatcher)]


async def _endpoint(hooks: WebhookDispatcher, caller: Caller, endpoint_id: str) -> Endpoint:
    ep = await hooks.store.get(endpoint_id)
    if ep is None or not caller.may(ep):
        raise APIError(404, f"No webhook endpoint '{endpoint_id}'.", param="webhook_id", code="not_found")
    return ep


def _stored(ep: Endpoint) -> Endpoint:
    """Endpoints from the settings change with the settings, not through the API."""
    if ep.source == "settings":
        raise APIError(
            409,
            f"Webhook endpoint '{ep.id}' comes from INFERQ_WEBHOOKS; change it in the settings.",
            param="webhook_id",
            code="endpoint_from_settings",
        )
    return ep


@router.post(
    "",
    response_model=WebhookEndpoint,
    response_model_exclude_none=True,
    summary="Create a webhook endpoint (answers its secret, once)",
    responses=error_responses(400, 403),
)
async def create_webhook(
    body: WebhookCreate, st: StateDep, caller: CallerDep, hooks: HooksDep
) -> WebhookEndpoint:
    if unknown := bad_events(body.events or []):
        raise APIError(
            400,
            f"Unknown event type(s) {', '.join(map(repr, unknown))}; known: {', '.join(EVENT_TYPES)}.",
            param="events",
            code="invalid_value",
        )
    if body.all_keys and not caller.sees_all:
        raise APIError(
            403,
            "Only an admin key (INFERQ_ADMIN_KEYS) may make an endpoint that hears of every key.",
            param="all_keys",
            code="admin_key_required",
            type_="permission_error",
        )
    try:
        await guard.check(body.url, hooks.allow, st.settings.webhook_timeout_s)
    except guard.Refused as exc:
        raise APIError(400, f"Webhook URL refused: {exc}.", param="url", code="invalid_url") from None
    events = list(dict.fromkeys(body.events or []))
    ep = await hooks.store.create(body.url, events, caller.owner, body.all_keys)
    return ep.public(with_secret=True)


@router.get(
    "",
    response_model=WebhookList,
    response_model_exclude_none=True,
    summary="List webhook endpoints",
    responses=error_responses(),
)
async def list_webhooks(caller: CallerDep, hooks: HooksDep) -> WebhookList:
    every = [*hooks.store.configured, *await hooks.store.stored()]
    return WebhookList(data=[ep.public() for ep in every if caller.may(ep)])


@router.get(
    "/{webhook_id}",
    response_model=WebhookEndpoint,
    response_model_exclude_none=True,
    summary="Get a webhook endpoint",
    responses=error_responses(404),
)
async def get_webhook(webhook_id: str, caller: CallerDep, hooks: HooksDep) -> WebhookEndpoint:
    return (await _endpoint(hooks, caller, webhook_id)).public()


@router.delete(
    "/{webhook_id}",
    response_model=WebhookDeleted,
    summary="Delete a webhook endpoint (its pending deliveries fail)",
    responses=error_responses(404, 409),
)
async def delete_webhook(webhook_id: str, caller: CallerDep, hooks: HooksDep) -> WebhookDeleted:
    ep = _stored(await _endpoint(hooks, caller, webhook_id))
    await hooks.store.delete(ep.id)
    return WebhookDeleted(id=ep.id)


@router.post(
    "/{webhook_id}/rotate_secret",
    response_model=WebhookEndpoint,
    response_model_exclude_none=True,
    summary="A new signing secret; the old one keeps signing beside it for a while",
    responses=error_responses(404, 409),
)
async def rotate_secret(webhook_id: str, st: StateDep, caller: CallerDep, hooks: HooksDep) -> WebhookEndpoint:
    ep = _stored(await _endpoint(hooks, caller, webhook_id))
    ep = await hooks.store.rotate(ep, st.settings.webhook_secret_overlap_s)
    return ep.public(with_secret=True)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=WebhookDeliveryList,
    summary="An endpoint's deliveries and their attempts, newest first",
    responses=error_responses(404),
)
async def list_deliveries(
    webhook_id: str, caller: CallerDep, hooks: HooksDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> WebhookDeliveryList:
    ep = await _endpoint(hooks, caller, webhook_id)
    data, more = await hooks.store.deliveries(ep.id, limit)
    return WebhookDeliveryList(data=data, has_more=more)
