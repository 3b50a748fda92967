"""The per-key rate limit: at most `INFERQ_RATE_LIMIT_PER_MINUTE` requests in *any* 60 s.

Why a moving window: the fixed window it replaces (one counter per clock minute) let twice the
limit through around a minute boundary (measured: 80 of 80 requests accepted in 10 s at
40/min). The `limits` library's moving window keeps one timestamp per accepted request (a
Redis list, trimmed to the limit, one Lua call per request) and accepts a request only while
fewer than the limit fall in the last 60 s.

It runs on the API's own redis-py client (its connection pool, timeouts and URL): `limits`
5.8 defaults to `coredis`, which is not installed, while its `redispy` bridge takes a pool.
A Redis error propagates as `redis.exceptions.RedisError`, which the API answers with the
same 503 as every other store outage (api.errors).

Every answer to a limited key carries OpenAI's `x-ratelimit-*-requests` headers (`RateHeaders`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio as aredis
from fastapi import Request
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError
from core import keys


def duration(seconds: float) -> str:
    """OpenAI's format for `x-ratelimit-reset-requests` (Go's duration: `12ms`, `1s`, `8.64s`,
    `6m0s`), so clients that parse OpenAI's headers parse ours."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


@dataclass(frozen=True)
class RateState:
    """Where a key stands after a request: what OpenAI's headers say."""

    limit: int
    remaining: int
    #: seconds until the oldest request counted leaves the window (one more is allowed then)
    reset_s: float

    @property
    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": duration(self.reset_s),
        }


class RateLimiter:
    """One per app: the `limits` storage over the app's Redis pool, keys under RATE_PREFIX."""

    def __init__(self, client: aredis.Redis, per_minute: int) -> None:
        storage = RedisStorage(
            "async+redis://",  # unused: the connection pool below is the app's
            implementation="redispy",
            key_prefix=keys.RATE_PREFIX,
            connection_pool=client.connection_pool,  # type: ignore[arg-type]
        )
        self.client = client
        self.limiter = MovingWindowRateLimiter(storage)
        self.item = RateLimitItemPerMinute(per_minute)

    async def hit(self, owner: str) -> tuple[bool, RateState]:
        """Counts one request of `owner` if the window has room: (accepted, where it stands)."""
        accepted = await self.limiter.hit(self.item, owner)
        stats = await self.limiter.get_window_stats(self.item, owner)
        return accepted, RateState(
            limit=self.item.amount,
            remaining=max(0, stats.remaining),
            reset_s=max(0.0, stats.reset_time - time.time()),
        )


async def enforce(request: Request, client: aredis.Redis, owner: str, per_minute: int) -> None:
    """Counts the request against its key's limit: the headers go on whatever the route
    answers (`RateHeaders`); over the limit, the 429 with `Retry-After` (whole seconds until
    a request is allowed again, rounded up)."""
    accepted, state = await limiter_for(request.app.state, client, per_minute).hit(owner)
    request.state.rate_limit = state
    if accepted:
        return
    retry = max(1, math.ceil(state.reset_s))
    raise APIError(
        429,
        f"Rate limit of {per_minute} requests per minute reached; retry in {retry}s.",
        code="rate_limit_exceeded",
        type_="rate_limit_error",
        headers={"Retry-After": str(retry)},
    )


def limiter_for(state: object, client: aredis.Redis, per_minute: int) -> RateLimiter:
    """The app's limiter, made on first use and kept on `state` (the app's Starlette state):
    AppState is the lifespan's, and the limiter needs nothing the lifespan must close."""
    limiter: RateLimiter | None = getattr(state, "rate_limiter", None)
    if limiter is None or limiter.client is not client or limiter.item.amount != per_minute:
        limiter = RateLimiter(client, per_minute)
        setattr(state, "rate_limiter", limiter)  # noqa: B010 (Starlette State takes any name)
    return limiter


class RateHeaders:
    """Puts a limited key's `x-ratelimit-*` headers on every answer, whatever produced it: a
    route's model, a `Response` a route built itself, an error handler's (FastAPI merges a
    dependency's headers only into the first). Pure ASGI: streams pass through unbuffered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})

        async def tagged(message: Message) -> None:
            limited: RateState | None = state.get("rate_limit")
            if message["type"] == "http.response.start" and limited is not None:
                names = {k.encode() for k in limited.headers}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                extra = [(k.encode(), v.encode()) for k, v in limited.headers.items()]
                message = {**message, "headers": [*headers, *extra]}
            await send(message)

        await self.app(scope, receive, tagged)
