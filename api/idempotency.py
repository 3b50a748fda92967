"""`Idempotency-Key` on the creating POSTs: a retry of a request returns the first answer and
creates nothing (docs/idempotency-and-limits.md).

Pure ASGI, inside the request guard (its size checks come first) and outside the routes, so
every listed route gets it without knowing: the body is read once (api.spooled_body),
fingerprinted, and the key claimed with SET NX; the first request runs, its answer is kept for
`INFERQ_IDEMPOTENCY_TTL_S`, and a request that finds the key answered is replayed
(`Idempotent-Replayed: true`). A request that finds it still running waits for the answer on
the asynchronous endpoints (the answer comes at once: a job id) and gets a 409 on the
synchronous ones (the answer may be minutes of generation away).

What is not kept, so that a retry runs again: 5xx, 401, 403 and 429 answers (the request
may succeed next time), answers to a client that disconnected, and answers over
`MAX_KEPT_BODY`. A stream (`text/event-stream`) cannot be replayed: what identifies it (its
job id) is kept and a retry hears a 409 naming it."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import IO, Any

import redis.asyncio as aredis
import redis.exceptions
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.spooled_body import ClientGone, Replay, header, read_body
from core import keys, scripts
from core.auth import hash_key, owner_of
from core.config import Settings
from schemas.openai import error_body

logger = logging.getLogger(__name__)

HEADER = b"idempotency-key"
PARAM = "Idempotency-Key"
MAX_KEY_CHARS = 255
#: path -> whether a request still in flight is waited for (asynchronous: it answers at once);
#: /v1/responses is asynchronous only with `"background": true` in its body
PATHS = {
    "/v1/jobs": True,
    "/v1/batches": True,
    "/v1/files": True,
    "/v1/responses": False,
    "/v1/chat/completions": False,
}
#: how long a request waits for the first one with its key (asynchronous endpoints)
WAIT_S = 30.0
POLL_S = 0.05
#: a claim's TTL while its request runs, renewed every third of it: the keys of an API
#: process that died mid-request are free again within this
LEASE_S = 30
#: answers larger than this are not kept (the key is released)
MAX_KEPT_BODY = 4 << 20
#: answer headers a replay repeats (not per-request ones: x-request-id, timing, rate limit)
KEPT_HEADERS = frozenset({b"content-type", b"location", b"x-inferq-job-id"})
_NOT_KEPT = frozenset({401, 403, 429})


@dataclass
class Attempt:
    """One request that carries a key, once its body is read."""

    key: str  # the Redis key of its record
    fingerprint: str
    asynchronous: bool
    ttl_s: int
    claim: str = field(init=False)

    def __post_init__(self) -> None:
        self.claim = json.dumps({"fp": self.fingerprint, "state": "running", "id": uuid.uuid4().hex})


class Recorder:
    """The app's `send`: passes every message on and keeps what a replay needs."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.streamed = False
        self.complete = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = [(k.lower(), v) for k, v in message.get("headers", [])]
            ctype = dict(self.headers).get(b"content-type", b"")
            self.streamed = ctype.startswith(b"text/event-stream")
        elif message["type"] == "http.response.body":
            chunk: bytes = message.get("body", b"")
            self.size += len(chunk)
            if not self.streamed and self.size <= MAX_KEPT_BODY:
                self.body.append(chunk)
            self.complete = not message.get("more_body", False)
        await self._send(message)

    def record(self, fingerprint: str) -> dict[str, Any] | None:
        """What to keep of the answer, or None when a retry should run again."""
        if not self.complete or self.status >= 500 or self.status in _NOT_KEPT:
            return None
        if self.size > MAX_KEPT_BODY and not self.streamed:
            return None
        kept = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers if k in KEPT_HEADERS]
        answer: dict[str, Any] = {"fp": fingerprint, "state": "done", "status": self.status, "headers": kept}
        if self.streamed:
            answer["streamed"] = True
        else:
            answer["body"] = base64.b64encode(b"".join(self.body)).decode()
        return answer


class Idempotency:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS:
            await self.app(scope, receive, send)
            return
        sent = [v for k, v in scope.get("headers", []) if k.lower() == HEADER]
        if not sent:
            await self.app(scope, receive, send)
            return
        idem = sent[0].decode("latin-1")
        if len(sent) > 1 or not 0 < len(idem) <= MAX_KEY_CHARS:
            message = f"{PARAM} must be one value of 1 to {MAX_KEY_CHARS} characters."
            await _error(send, 400, message, "invalid_idempotency_key")
            return
        try:
            spool, size, fingerprint = await read_body(scope, receive)
        except ClientGone:
            return
        except StarletteHTTPException as exc:  # the request guard's 413, raised by its receive
            await _error(send, exc.status_code, str(exc.detail), getattr(exc, "code", None), param=None)
            return
        with spool:
            await self._serve(scope, (spool, size, receive), send, idem, fingerprint)

    async def _serve(
        self, scope: Scope, body: tuple[IO[bytes], int, Receive], send: Send, idem: str, fingerprint: str
    ) -> None:
        state = scope["app"].state.inferq
        settings: Settings = state.settings
        path: str = scope["path"]
        attempt = Attempt(
            key=keys.idempotency(_owner(scope, settings), f"POST {path}", idem),
            fingerprint=fingerprint,
            asynchronous=PATHS[path] or (path == "/v1/responses" and _background(body[0])),
            ttl_s=settings.idempotency_ttl_s,
        )
        recorder = Recorder(send)
        replay = Replay(*body, answered=lambda: recorder.complete)
        try:
            await self._claim_or_replay(scope, replay, recorder, state.redis, attempt)
        except redis.exceptions.RedisError as exc:
            if recorder.status:  # the answer has begun: nothing more can be said
                raise
            logger.warning("state store unavailable: %s", exc)
            await _store_unavailable(send)

    async def _claim_or_replay(
        self, scope: Scope, replay: Replay, recorder: Recorder, client: aredis.Redis, attempt: Attempt
    ) -> None:
        """Claims the key and runs the request, or answers from its record: at once when it is
        answered or belongs to another body, after waiting while an asynchronous first
        request runs. A key released meanwhile (its first answer was not kept) is claimed
        again, so the retry runs."""
        deadline = time.monotonic() + WAIT_S
        while True:
            if await client.set(attempt.key, attempt.claim, nx=True, ex=LEASE_S):
                await self._first(scope, replay, recorder, client, attempt)
                return
            raw = await client.get(attempt.key)
            if raw is None:
                continue
            record = json.loads(raw)
            waiting = attempt.asynchronous and time.monotonic() < deadline
            if record["fp"] == attempt.fingerprint and record["state"] == "running" and waiting:
                await asyncio.sleep(POLL_S)
                continue
            await _from_record(recorder, record, attempt.fingerprint)
            return

    async def _first(
        self, scope: Scope, replay: Replay, recorder: Recorder, client: aredis.Redis, attempt: Attempt
    ) -> None:
        renewer = asyncio.get_running_loop().create_task(_renew(client, attempt))
        answer: dict[str, Any] | None = None
        try:
            await self.app(scope, replay, recorder)
            answer = None if replay.disconnected else recorder.record(attempt.fingerprint)
        finally:
            renewer.cancel()
            settle = client.register_script(scripts.source("idempotency_settle"))
            value = json.dumps(answer) if answer else ""
            try:
                await settle(keys=[attempt.key], args=[attempt.claim, value, attempt.ttl_s])
            except redis.exceptions.RedisError as exc:  # the claim lapses within LEASE_S
                logger.warning("idempotency key not settled: %s", exc)


async def _renew(client: aredis.Redis, attempt: Attempt) -> None:
    """Keeps the claim alive while its request runs (a long chat completion)."""
    while True:
        await asyncio.sleep(LEASE_S / 3)
        try:
            await client.expire(attempt.key, LEASE_S)
        except redis.exceptions.RedisError as exc:
            logger.warning("idempotency claim not renewed: %s", exc)


def _owner(scope: Scope, settings: Settings) -> str:
    """The owner id routes use (api.auth): keys are per API key. A wrong token only makes a
    namespace whose first answer, a 401, is never kept."""
    if not settings.auth_enabled:
        return ""
    scheme, _, token = header(scope, b"authorization").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    return owner_of(hash_key(token)) if token else ""


def _background(spool: IO[bytes]) -> bool:
    """Whether a /v1/responses body asks for `"background": true` (it answers at once then)."""
    spool.seek(0)
    try:
        body = json.loads(spool.read())
    except ValueError:
        return False
    finally:
        spool.seek(0)
    return isinstance(body, dict) and body.get("background") is True


async def _from_record(send: Send, record: dict[str, Any], fingerprint: str) -> None:
    """The answer to a request whose key already has a record."""
    if record["fp"] != fingerprint:
        message = f"This {PARAM} was already used with a different request; send a new key for a new request."
        await _error(send, 422, message, "idempotency_key_reused")
    elif record["state"] == "running":
        message = f"A request with this {PARAM} is still being processed; retry once it has been answered."
        await _error(send, 409, message, "idempotency_key_in_flight", headers=[(b"retry-after", b"1")])
    elif record.get("streamed"):
        job = dict(record["headers"]).get("x-inferq-job-id", "")
        message = (
            f"The first request with this {PARAM} was answered with a stream, which cannot be "
            f"replayed; read its job instead: GET /v1/jobs/{job} (events: /v1/jobs/{job}/events)."
        )
        extra = [(b"x-inferq-job-id", job.encode("latin-1"))] if job else []
        await _error(send, 409, message, "idempotency_key_streamed", headers=extra)
    else:
        body = base64.b64decode(record["body"])
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in record["headers"]]
        headers += [(b"idempotent-replayed", b"true"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": record["status"], "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _error(
    send: Send,
    status: int,
    message: str,
    code: str | None,
    *,
    param: str | None = PARAM,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await _json(send, status, error_body(message, "invalid_request_error", param, code), headers or [])


async def _store_unavailable(send: Send) -> None:
    """The 503 every route answers when Redis fails (api.errors)."""
    body = error_body(
        "The job store is unavailable; retry shortly.", "service_unavailable", None, "store_unavailable"
    )
    await _json(send, 503, body, [(b"retry-after", b"5")])


async def _json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    data = json.dumps(body).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*start, *headers]})
    await send({"type": "http.response.body", "body": data})
