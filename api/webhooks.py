"""The webhook dispatcher: every API process reads the ended-objects stream, fans each event
out into deliveries, and sends the deliveries that are due, signed per Standard Webhooks.

Why in the API, and why this way:
- The API is the one process with HTTP clients and the endpoints' secrets to hand; workers
  stay about running jobs. Ends are announced by whoever ends an object (the transition
  script, the batch finalizer) into one stream, so an end that happens while no API runs
  is read when one starts again.
- A consumer group shares the stream among API processes: each event is fanned out once.
  An event is acknowledged only after its deliveries exist; one left pending by a process
  that died is claimed by another (XAUTOCLAIM) after RECLAIM_IDLE_MS, and a delivery's
  deterministic id makes that second fan-out add nothing.
- The retry schedule is a sorted set of due times; a sender leases what it takes (a
  script moves its due time past the lease), so a process that dies mid-send leaves the
  delivery due again. Nothing waits in memory only.
- Idle, the consumer blocks in XREADGROUP and the sender sleeps until the next due time
  (at most IDLE_MAX_S, or until a new delivery wakes it): no spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

import httpx
import redis.asyncio as aredis
from prometheus_client.core import CounterMetricFamily, Metric
from redis.exceptions import ResponseError
from standardwebhooks import Webhook

from api import webhook_guard as guard
from core import keys
from core.config import Settings, version
from core.metrics import Snapshot
from core.webhooks import Endpoint, WebhookStore, delivery_id, event_id
from schemas.webhooks import DeliveryAttempt, event_body, event_type, object_id

logger = logging.getLogger("inferq.webhooks")

GROUP = "inferq-webhooks"
#: an entry another consumer has held this long unacknowledged is taken over (its API died)
RECLAIM_IDLE_MS = 30_000
RECLAIM_EVERY_S = 10.0
#: consumers (API processes) idle this long with nothing pending are forgotten
CONSUMER_FORGET_MS = 3_600_000
BLOCK_MS = 5_000
IDLE_MAX_S = 1.0
MAX_IN_FLIGHT = 32
#: shutdown waits at most this long for the loops and deliveries in flight
STOP_WAIT_S = 3.0


def sign_headers(ep: Endpoint, msg_id: str, body: str, now: float) -> dict[str, str]:
    """Standard Webhooks headers; during a rotation's overlap one signature per secret,
    space-separated (a receiver verifying with either secret finds its own)."""
    stamp = datetime.fromtimestamp(int(now), tz=UTC)
    signatures = [Webhook(secret).sign(msg_id, stamp, body) for secret in ep.secrets_at(now)]
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": " ".join(signatures),
        "content-type": "application/json",
        "user-agent": f"inferq-webhooks/{version()}",
    }


def next_attempt(settings: Settings, attempts_made: int, now: float) -> float | None:
    """When to try again after `attempts_made` failed attempts (None: give up). The first
    attempt is immediate; then one `webhook_retry_s` delay per retry."""
    delays = settings.webhook_retry_s
    return now + delays[attempts_made - 1] if attempts_made <= len(delays) else None


class WebhookDispatcher:
    def __init__(self, r: aredis.Redis, stream_r: aredis.Redis, settings: Settings) -> None:
        self.r, self.stream_r, self.settings = r, stream_r, settings
        self.store = WebhookStore(r, settings)
        self.allow = guard.AllowList.parse(settings.webhook_allow_hosts)
        self.consumer = f"api-{uuid.uuid4().hex[:12]}"
        self.lease_s = 2 * settings.webhook_timeout_s + 30
        self.wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self.http = httpx.AsyncClient(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        )

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._consume()), loop.create_task(self._send_loop())]

    async def stop(self) -> None:
        """Cancel the loops, bounded: a cancel that lands as a blocking read or a wait ends
        can be lost on Python 3.11 (the task then loops on), so the loops also check
        `_stopping`, and shutdown never waits on them for more than STOP_WAIT_S."""
        self._stopping = True
        self.wake.set()
        tasks = [*self._tasks, *self._in_flight]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            if pending:
                logger.debug("webhook dispatcher: %d task(s) still stopping at shutdown", len(pending))
        await self.http.aclose()

    # --- reading events -------------------------------------------------------------
    async def _ensure_group(self) -> None:
        try:
            await self.r.xgroup_create(keys.WEBHOOK_EVENTS, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # MKSTREAM makes the key without a TTL; the writers refresh it from then on
        await self.r.expire(keys.WEBHOOK_EVENTS, self.settings.result_ttl_s, nx=True)
        if self.store.configured:  # the transition script announces ends while this is set
            await self.r.set(keys.WEBHOOKS_CONFIGURED, "1", ex=self.settings.result_ttl_s)

    async def _consume(self) -> None:
        reclaim_at = 0.0
        while not self._stopping:
            try:
                if time.monotonic() >= reclaim_at:
                    await self._ensure_group()
                    await self._reclaim()
                    reclaim_at = time.monotonic() + RECLAIM_EVERY_S
                got = await self.stream_r.xreadgroup(
                    GROUP, self.consumer, {keys.WEBHOOK_EVENTS: ">"}, count=64, block=BLOCK_MS
                )
                for _stream, entries in cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], got or []):
                    await self._handle(entries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down, the stream expired with its group: again
                logger.warning("webhook events: %s; reading again in 1 s", exc)
                reclaim_at = 0.0
                await asyncio.sleep(1)

    async def _reclaim(self) -> None:
        """Entries a dead API process read and never acknowledged; and that process's name."""
        _, entries, *_ = await self.r.xautoclaim(
            keys.WEBHOOK_EVENTS,
            GROUP,
            self.consumer,
            min_idle_time=RECLAIM_IDLE_MS,
            start_id="0-0",
            count=100,
        )
        await self._handle(entries)
        for info in await self.r.xinfo_consumers(keys.WEBHOOK_EVENTS, GROUP):
            if info["name"] != self.consumer and not info["pending"] and info["idle"] > CONSUMER_FORGET_MS:
                await self.r.xgroup_delconsumer(keys.WEBHOOK_EVENTS, GROUP, info["name"])

    async def _handle(self, entries: Sequence[tuple[str, dict[str, str] | None]]) -> None:
        """The endpoints are read once for what one read returned, and the entries are
        acknowledged together once their deliveries exist."""
        if not entries:
            return
        endpoints = [*self.store.configured, *await self.store.stored()]
        for entry_id, fields in entries:
            if fields:  # None: trimmed from the stream while pending
                await self.fan_out(entry_id, fields, endpoints)
        await self.r.xack(keys.WEBHOOK_EVENTS, GROUP, *[entry_id for entry_id, _ in entries])

    async def fan_out(self, entry_id: str, fields: dict[str, str], candidates: list[Endpoint]) -> int:
        """One delivery per endpoint of `candidates` that hears of this event; returns how
        many were new."""
        kind, oid, status = fields.get("kind", ""), fields.get("id", ""), fields.get("status", "")
        result = None
        if kind == "response" and status == "succeeded":
            result = cast(str | None, await self.r.hget(keys.job(oid), "result"))
        etype = event_type(kind, status, result)
        if etype is None:
            return 0
        owner = fields.get("owner", "")
        endpoints = [ep for ep in candidates if ep.hears(owner, etype)]
        if not endpoints:
            return 0
        eid, created = event_id(entry_id), int(float(fields.get("at") or time.time()))
        data_id = object_id(kind, oid)
        body = event_body(eid, etype, created, data_id)
        added, now = 0, time.time()
        for ep in endpoints:
            fields_ = {
                "id": delivery_id(eid, ep.id),
                "endpoint_id": ep.id,
                "event_id": eid,
                "event_type": etype,
                "data_id": data_id,
                "created_at": str(created),
                "body": body,
            }
            added += await self.store.add_delivery(fields_, now)
        if added:
            self.wake.set()
        return added

    # --- sending --------------------------------------------------------------------
    async def _send_loop(self) -> None:
        while not self._stopping:
            try:
                if len(self._in_flight) >= MAX_IN_FLIGHT:
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                self.wake.clear()
                taken = await self.store.claim(
                    time.time(), self.lease_s, MAX_IN_FLIGHT - len(self._in_flight)
                )
                for did in taken:
                    task = asyncio.get_running_loop().create_task(self._deliver(did))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                if not taken:
                    await self._idle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("webhook sender: %s; again in 1 s", exc)
                await asyncio.sleep(1)

    async def _idle(self) -> None:
        """Until the next due time (at most IDLE_MAX_S), or a new delivery."""
        due = await self.store.next_due()
        wait = IDLE_MAX_S if due is None else min(max(due - time.time(), 0.01), IDLE_MAX_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self.wake.wait()

    async def _deliver(self, did: str) -> None:
        try:
            raw = await self.store.delivery(did)
            if not raw or raw.get("status") != "pending":
                await self.store.drop(did)
                return
            ep = await self.store.get(raw["endpoint_id"])
            if ep is None:
                attempt = DeliveryAttempt(at=time.time(), error="the endpoint was deleted")
                await self.store.record(raw, attempt, "failed", None)
                return
            attempt, outcome = await self.post(ep, raw)
            made = len(json.loads(raw.get("attempts") or "[]")) + 1
            next_at = None if outcome == "succeeded" else next_attempt(self.settings, made, time.time())
            await self.store.record(raw, attempt, outcome, next_at)
            if outcome != "succeeded":
                logger.info("webhook %s to %s: %s", did, ep.url, attempt.error or attempt.status_code)
        except asyncio.CancelledError:
            raise
        except Exception:  # its lease runs out and it is taken again
            logger.exception("webhook delivery %s failed to run; it is tried again after its lease", did)

    async def post(self, ep: Endpoint, raw: dict[str, str]) -> tuple[DeliveryAttempt, str]:
        """One attempt: the SSRF check on the resolved addresses, then a POST to the address
        checked (not to a second lookup). Outcome: succeeded (2xx), failed or refused."""
        now, start = time.time(), time.monotonic()
        try:
            parts, addrs = await guard.check(ep.url, self.allow, self.settings.webhook_timeout_s)
        except guard.Refused as exc:
            return DeliveryAttempt(at=now, error=f"refused: {exc}"), "refused"
        body = raw["body"]
        headers = sign_headers(ep, raw["event_id"], body, now)
        headers["host"] = parts.netloc
        error = "no address"
        for addr in addrs:
            url = httpx.URL(ep.url).copy_with(host=str(addr))
            ext = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
            try:
                resp = await self.http.post(url, content=body.encode(), headers=headers, extensions=ext)
            except httpx.ConnectError as exc:
                error = f"ConnectError: {exc}"
                continue  # the next address of the name
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                break
            ms = int((time.monotonic() - start) * 1000)
            ok = 200 <= resp.status_code < 300
            attempt = DeliveryAttempt(
                at=now,
                status_code=resp.status_code,
                duration_ms=ms,
                error=None if ok else f"HTTP {resp.status_code}",
            )
            return attempt, "succeeded" if ok else "failed"
        ms = int((time.monotonic() - start) * 1000)
        return DeliveryAttempt(at=now, error=error, duration_ms=ms), "failed"


def families(snap: Snapshot) -> list[Metric]:
    """Webhook attempts by outcome and deliveries by end, for GET /metrics (api.status_view)."""
    attempts = CounterMetricFamily(
        "inferq_webhook_attempts",
        "Webhook delivery attempts, by outcome (succeeded: 2xx; failed: other answer, timeout, "
        "connection error; refused: the URL's address is not allowed).",
        labels=["outcome"],
    )
    for outcome in ("succeeded", "failed", "refused"):
        attempts.add_metric([outcome], snap.webhook_attempts.get(outcome, 0))
    deliveries = CounterMetricFamily(
        "inferq_webhook_deliveries", "Webhook deliveries that ended, by status.", labels=["status"]
    )
    for status in ("delivered", "failed"):
        deliveries.add_metric([status], snap.webhook_deliveries.get(status, 0))
    return [attempts, deliveries]
