"""Webhook state in Redis: endpoints (per API key, or from settings), deliveries and their
retry schedule, the metrics counters, and the batch finalizer's event.

Why all of it lives in Redis: the API may run as several processes and restart at any time;
an endpoint made through one process must be heard of by the others, and a delivery due in
five hours must survive a restart. A delivery is one event to one endpoint, with a
deterministic id (event id + endpoint id): reading an event twice (a dispatcher that died
before acknowledging it) finds the delivery already there and adds nothing.

The sending itself (HTTP, signing, the SSRF check) is the API's (api.webhooks)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aredis
from redis.exceptions import WatchError

from core import keys, scripts
from core.config import Settings
from schemas.webhooks import EVENT_TYPES, DeliveryAttempt, WebhookDelivery, WebhookEndpoint

#: deliveries listed per endpoint (older ones leave the index, and expire with their TTL)
DELIVERIES_KEPT = 1000


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def bad_events(events: list[str]) -> list[str]:
    return [e for e in events if e not in EVENT_TYPES]


@dataclass
class Endpoint:
    id: str
    url: str
    events: list[str]
    owner: str = ""
    all_keys: bool = False
    created_at: int = 0
    secret: str = ""
    #: the secret before the last rotation, still signed with until `old_secret_until`
    old_secret: str = ""
    old_secret_until: float = 0.0
    source: str = "api"

    def hears(self, owner: str, event_type: str) -> bool:
        """Whether an event of `owner`'s object is for this endpoint."""
        mine = self.all_keys or self.source == "settings" or self.owner == owner
        return mine and (not self.events or event_type in self.events)

    def secrets_at(self, now: float) -> list[str]:
        """The secrets a delivery is signed with now: the current one, and during a rotation's
        overlap the previous one too (a receiver still on it keeps verifying)."""
        if self.old_secret and now < self.old_secret_until:
            return [self.secret, self.old_secret]
        return [self.secret]

    def public(self, *, with_secret: bool = False) -> WebhookEndpoint:
        return WebhookEndpoint(
            id=self.id,
            url=self.url,
            events=self.events,
            created_at=self.created_at,
            all_keys=self.all_keys,
            source="settings" if self.source == "settings" else "api",
            secret=self.secret if with_secret else None,
        )


def _decode_endpoint(raw: dict[str, str]) -> Endpoint:
    return Endpoint(
        id=raw["id"],
        url=raw["url"],
        events=json.loads(raw.get("events") or "[]"),
        owner=raw.get("owner", ""),
        all_keys=raw.get("all_keys") == "1",
        created_at=int(raw.get("created_at") or 0),
        secret=raw.get("secret", ""),
        old_secret=raw.get("old_secret", ""),
        old_secret_until=float(raw.get("old_secret_until") or 0),
    )


def configured_endpoints(settings: Settings) -> list[Endpoint]:
    """INFERQ_WEBHOOKS: endpoints that hear of every key's objects (checked when the settings
    are read: core.config.WebhookSetting). Their id is derived from url and events, so every
    API process (and every restart) names them alike and their deliveries stay listed under
    one id."""
    out = []
    for entry in settings.webhooks:
        digest = hashlib.sha256(json.dumps([entry.url, entry.events]).encode()).hexdigest()[:24]
        out.append(
            Endpoint(
                id=f"we_cfg_{digest}",
                url=entry.url,
                events=list(entry.events),
                secret=entry.secret,
                source="settings",
            )
        )
    return out


def delivery_ttl(settings: Settings) -> int:
    """A delivery outlives its whole retry schedule (about three days by default) and is
    then kept a result TTL for the listing."""
    return int(sum(settings.webhook_retry_s)) + settings.result_ttl_s


def event_id(stream_id: str) -> str:
    """The event's id from its stream entry: the same on every re-read, so the webhook-id
    header is the same on every retry and receivers can drop duplicates by it."""
    return "evt_" + hashlib.sha256(stream_id.encode()).hexdigest()[:32]


def delivery_id(event: str, endpoint_id: str) -> str:
    return "whd_" + hashlib.sha256(f"{event}|{endpoint_id}".encode()).hexdigest()[:32]


def batch_ended(pipe: Any, batch_id: str, status: str, owner: str, ttl: int) -> None:
    """The batch finalizer's event (batch.completed, ...), on its pipeline: announced in the
    same MULTI that writes the batch's end status, so no end goes unannounced or twice."""
    fields = {"kind": "batch", "id": batch_id, "status": status, "owner": owner, "at": str(int(time.time()))}
    pipe.xadd(keys.WEBHOOK_EVENTS, fields, maxlen=keys.WEBHOOK_EVENTS_MAXLEN, approximate=True)
    pipe.expire(keys.WEBHOOK_EVENTS, ttl)


class WebhookStore:
    """Endpoints and deliveries, for the routes and the dispatcher."""

    def __init__(self, r: aredis.Redis, settings: Settings) -> None:
        self.r, self.settings = r, settings
        self.endpoint_ttl = settings.key_ttl_s
        self.delivery_ttl = delivery_ttl(settings)
        self._claim = r.register_script(scripts.source("webhook_claim"))
        self.configured = configured_endpoints(settings)

    # --- endpoints ------------------------------------------------------------------
    async def create(self, url: str, events: list[str], owner: str, all_keys: bool) -> Endpoint:
        ep = Endpoint(
            id=f"we_{uuid.uuid4().hex}",
            url=url,
            events=events,
            owner=owner,
            all_keys=all_keys,
            created_at=int(time.time()),
            secret=new_secret(),
        )
        fields = {
            "id": ep.id,
            "url": url,
            "events": json.dumps(events),
            "owner": owner,
            "all_keys": "1" if all_keys else "",
            "created_at": str(ep.created_at),
            "secret": ep.secret,
        }
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(keys.webhook(ep.id), mapping=cast(Any, fields))
            pipe.expire(keys.webhook(ep.id), self.endpoint_ttl)
            pipe.sadd(keys.WEBHOOK_INDEX, ep.id)
            pipe.expire(keys.WEBHOOK_INDEX, self.endpoint_ttl)
            await pipe.execute()
        return ep

    async def get(self, endpoint_id: str) -> Endpoint | None:
        for ep in self.configured:
            if ep.id == endpoint_id:
                return ep
        raw = cast(dict[str, str], await self.r.hgetall(keys.webhook(endpoint_id)))
        return _decode_endpoint(raw) if raw else None

    async def stored(self) -> list[Endpoint]:
        """Every endpoint made through the API (all keys'); ids whose record expired leave the index."""
        ids = sorted(cast(set[str], await self.r.smembers(keys.WEBHOOK_INDEX)))
        if not ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hgetall(keys.webhook(i))
            raws = cast(list[dict[str, str]], await pipe.execute())
        if gone := [i for i, raw in zip(ids, raws, strict=True) if not raw]:
            await self.r.srem(keys.WEBHOOK_INDEX, *gone)
        return sorted((_decode_endpoint(raw) for raw in raws if raw), key=lambda e: (e.created_at, e.id))

    async def delete(self, endpoint_id: str) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(keys.webhook(endpoint_id))
            pipe.srem(keys.WEBHOOK_INDEX, endpoint_id)
            await pipe.execute()

    async def rotate(self, ep: Endpoint, overlap_s: float) -> Endpoint:
        """A new secret; the current one keeps signing (beside it) for `overlap_s` seconds."""
        ep.old_secret, ep.old_secret_until, ep.secret = ep.secret, time.time() + overlap_s, new_secret()
        fields = {
            "secret": ep.secret,
            "old_secret": ep.old_secret,
            "old_secret_until": repr(ep.old_secret_until),
        }
        await self.r.hset(keys.webhook(ep.id), mapping=cast(Any, fields))
        return ep

    # --- deliveries -----------------------------------------------------------------
    async def add_delivery(self, fields: dict[str, str], due: float) -> bool:
        """A new delivery, due at `due`; False if it was there (an event read twice). WATCH,
        not a script: two processes fan out one event only when one of them died mid-way."""
        key = keys.webhook_delivery(fields["id"])
        async with self.r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                if await pipe.exists(key):
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]
                self._write_new(pipe, key, fields, due)
                await pipe.execute()
            except WatchError:
                return False
        return True

    def _write_new(self, pipe: Any, key: str, fields: dict[str, str], due: float) -> None:
        ttl, endpoint = self.delivery_ttl, fields["endpoint_id"]
        pipe.hset(
            key, mapping={**fields, "status": "pending", "attempts": "[]", "next_attempt_at": repr(due)}
        )
        pipe.expire(key, ttl)
        pipe.zadd(keys.WEBHOOK_DUE, {fields["id"]: due})
        pipe.expire(keys.WEBHOOK_DUE, ttl)
        pipe.zadd(keys.webhook_deliveries(endpoint), {fields["id"]: float(fields["created_at"])})
        pipe.zremrangebyrank(keys.webhook_deliveries(endpoint), 0, -DELIVERIES_KEPT - 1)
        pipe.expire(keys.webhook_deliveries(endpoint), ttl)

    async def claim(self, now: float, lease_s: float, limit: int) -> list[str]:
        return cast(
            list[str], await self._claim(keys=[keys.WEBHOOK_DUE], args=[repr(now), repr(lease_s), limit])
        )

    async def next_due(self) -> float | None:
        first = cast(list[tuple[str, float]], await self.r.zrange(keys.WEBHOOK_DUE, 0, 0, withscores=True))
        return first[0][1] if first else None

    async def delivery(self, delivery_id: str) -> dict[str, str]:
        return cast(dict[str, str], await self.r.hgetall(keys.webhook_delivery(delivery_id)))

    async def record(
        self, raw: dict[str, str], attempt: DeliveryAttempt, outcome: str, next_at: float | None
    ) -> None:
        """One attempt's result: the delivery's next due time, or its end (`delivered`,
        `failed`), and the metrics counters (`outcome`: succeeded, failed or refused)."""
        did = raw["id"]
        attempts = [*json.loads(raw.get("attempts") or "[]"), attempt.model_dump()]
        status = "delivered" if outcome == "succeeded" else ("pending" if next_at is not None else "failed")
        fields = {
            "attempts": json.dumps(attempts),
            "status": status,
            "next_attempt_at": repr(next_at) if next_at is not None else "",
        }
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(keys.webhook_delivery(did), mapping=cast(Any, fields))
            if next_at is None:
                pipe.zrem(keys.WEBHOOK_DUE, did)
            else:
                pipe.zadd(keys.WEBHOOK_DUE, {did: next_at})
            if outcome == "succeeded":  # an endpoint in use lives on (one from settings has no key)
                pipe.expire(keys.webhook(raw["endpoint_id"]), self.endpoint_ttl)
                pipe.expire(keys.WEBHOOK_INDEX, self.endpoint_ttl)
            pipe.hincrby(keys.METRICS, f"webhook_attempts|{outcome}", 1)
            if status != "pending":
                pipe.hincrby(keys.METRICS, f"webhook_deliveries|{status}", 1)
            pipe.expire(keys.METRICS, self.settings.result_ttl_s)
            await pipe.execute()

    async def drop(self, delivery_id: str) -> None:
        """A due id whose delivery is gone (expired) or already ended."""
        await self.r.zrem(keys.WEBHOOK_DUE, delivery_id)

    async def deliveries(self, endpoint_id: str, limit: int) -> tuple[list[WebhookDelivery], bool]:
        """An endpoint's deliveries, newest first."""
        ids = cast(list[str], await self.r.zrevrange(keys.webhook_deliveries(endpoint_id), 0, limit))
        async with self.r.pipeline(transaction=False) as pipe:
            for i in ids[:limit]:
                pipe.hgetall(keys.webhook_delivery(i))
            raws = cast(list[dict[str, str]], await pipe.execute())
        return [public_delivery(raw) for raw in raws if raw], len(ids) > limit


def public_delivery(raw: dict[str, str]) -> WebhookDelivery:
    nxt = raw.get("next_attempt_at") or ""
    return WebhookDelivery(
        id=raw["id"],
        endpoint_id=raw["endpoint_id"],
        event_id=raw["event_id"],
        event_type=raw["event_type"],
        data_id=raw["data_id"],
        created_at=int(raw["created_at"]),
        status=cast(Any, raw.get("status", "pending")),
        attempts=[DeliveryAttempt(**a) for a in json.loads(raw.get("attempts") or "[]")],
        next_attempt_at=float(nxt) if nxt and raw.get("status") == "pending" else None,
    )
