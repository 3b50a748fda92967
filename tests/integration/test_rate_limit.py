"""The per-key rate limit holds over any 60 s (api.rate_limit), on the session's real Valkey.

The app runs in this process (httpx's ASGITransport, the app's own lifespan), keys on, 40 a
minute; the wall clock the limit reads is a fake one the test moves, so 80 requests "over
10 s across a clock-minute boundary" take no real minute. Each test uses a fresh API key,
hence a fresh owner and fresh rate keys."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

import httpx
import pytest

from api.main import create_app
from cli.processes import free_port
from core.config import Settings

LIMIT = 40
#: the modules that read the wall clock for the limit: ours, and the `limits` bridge's
CLOCK_READERS = ("api.rate_limit", "limits.aio.storage.redis.redispy")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Starts 5 s before a clock minute (a real one's epoch, in the past: no key collides)."""
    import importlib

    fake = Clock(1_800_000_000 - 5.0)  # 1_800_000_000 is a whole minute (30_000_000 * 60)
    for name in CLOCK_READERS:
        monkeypatch.setattr(importlib.import_module(name), "time", SimpleNamespace(time=fake.time))
    return fake


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this process, its lifespan run, and a client of it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inferq") as client:
            yield client


@pytest.fixture()
async def api(redis_url: str) -> AsyncIterator[httpx.AsyncClient]:
    key = f"sk-{uuid.uuid4().hex}"
    settings = Settings(redis_url=redis_url, api_keys=[key], rate_limit_per_minute=LIMIT)
    async with running(settings) as client:
        client.headers["authorization"] = f"Bearer {key}"
        yield client


def most_in_any_window(times: list[float], window: float = 60.0) -> int:
    """The most of `times` that fall within any `window` seconds (starting at one of them)."""
    return max((sum(1 for t in times if s <= t < s + window) for s in times), default=0)


async def test_at_most_the_limit_in_any_60_s_across_a_minute_boundary(
    api: httpx.AsyncClient, clock: Clock
) -> None:
    """The issue's figure: 80 requests evenly over 10 s, from 5 s before a clock minute to 5 s
    after; the fixed window accepted all 80."""
    start = clock.now
    accepted: list[float] = []
    refused: list[httpx.Response] = []
    for i in range(80):
        clock.now = start + i * 0.125
        resp = await api.get("/v1/jobs")
        assert resp.status_code in (200, 429), resp.text
        (accepted.append(clock.now) if resp.status_code == 200 else refused.append(resp))
    assert most_in_any_window(accepted) <= LIMIT
    assert len(accepted) == LIMIT  # the first 40: the window was empty
    # the first refusal, at start + 5 s: the oldest request leaves the window at start + 60 s
    first = refused[0]
    assert first.json()["error"]["code"] == "rate_limit_exceeded"
    assert first.headers["retry-after"] == str(math.ceil(start + 60 - (start + 5.0)))  # "55"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["x-ratelimit-limit-requests"] == str(LIMIT)
    assert first.headers["x-ratelimit-reset-requests"] == "55s"


async def test_a_request_is_allowed_again_when_retry_after_says(api: httpx.AsyncClient, clock: Clock) -> None:
    start = clock.now
    for i in range(LIMIT):
        clock.now = start + i  # one a second: the window frees one slot per second later on
        resp = await api.get("/v1/jobs")
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-ratelimit-remaining-requests"] == str(LIMIT - 1 - i)
    clock.now = start + 45.5
    refused = await api.get("/v1/jobs")
    assert refused.status_code == 429
    retry = int(refused.headers["retry-after"])
    assert retry == 15  # start + 60 - 45.5 = 14.5, rounded up
    assert refused.headers["x-ratelimit-reset-requests"] == "14.5s"
    clock.now = start + 45.5 + retry - 1
    assert (await api.get("/v1/jobs")).status_code == 429
    clock.now = start + 45.5 + retry
    allowed = await api.get("/v1/jobs")
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["x-ratelimit-remaining-requests"] == "0"


async def test_every_answer_of_a_limited_key_carries_the_headers(
    api: httpx.AsyncClient, clock: Clock
) -> None:
    """A route's model, a route's own error (404) and a validation error (400) alike."""
    answers = [
        await api.get("/v1/jobs"),
        await api.get("/v1/jobs/job_nosuch"),
        await api.post("/v1/jobs", json={"model": "tiny"}),
    ]
    assert [a.status_code for a in answers] == [200, 404, 400]
    for n, answer in enumerate(answers, start=1):
        assert answer.headers["x-ratelimit-limit-requests"] == str(LIMIT)
        assert answer.headers["x-ratelimit-remaining-requests"] == str(LIMIT - n)
        assert re.fullmatch(r"(\d+m)?\d+(\.\d+)?s|\d+ms", answer.headers["x-ratelimit-reset-requests"])


async def test_no_headers_without_a_limit(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, api_keys=["sk-unlimited"], rate_limit_per_minute=0)
    async with running(settings) as client:
        resp = await client.get("/v1/jobs", headers={"authorization": "Bearer sk-unlimited"})
        assert resp.status_code == 200
        assert "x-ratelimit-limit-requests" not in resp.headers


async def test_redis_down_is_a_503_not_a_500() -> None:
    """The key is configured (no Redis needed to check it); the limit's store is down."""
    down = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(redis_url=down, api_keys=["sk-down"], rate_limit_per_minute=LIMIT, redis_timeout_s=1)
    async with running(settings) as client:
        resp = await client.get("/v1/jobs", headers={"authorization": "Bearer sk-down"})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "store_unavailable"
        assert resp.headers["retry-after"] == "5"
