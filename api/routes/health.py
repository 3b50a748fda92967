"""Liveness, readiness and the model list."""

from __future__ import annotations

import json
from typing import Any

import redis.exceptions
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.auth import OwnerDep
from api.deps import StateDep
from core import keys
from schemas.openai import ModelCard, ModelList

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. Says nothing about Redis or workers (see /ready)."""
    return {"status": "ok"}


async def live_workers(st: Any) -> list[dict[str, Any]]:
    found = []
    async for key in st.redis.scan_iter(match=keys.WORKER_PATTERN, count=100):
        raw = await st.redis.get(key)
        if raw:
            found.append(json.loads(raw))
    return found


@router.get("/ready")
async def ready(st: StateDep, _: OwnerDep) -> JSONResponse:
    """Ready: Redis answers and at least one worker child has a loaded engine and beats."""
    body: dict[str, Any] = {"redis": False, "workers": [], "validator": st.counter.ready}
    try:
        await st.redis.ping()
        body["redis"] = True
        body["workers"] = await live_workers(st)
    except (redis.exceptions.RedisError, OSError) as exc:
        body["error"] = f"redis unreachable: {exc}"
    ok = body["redis"] and bool(body["workers"]) and body["validator"]
    body["status"] = "ready" if ok else "not_ready"
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/v1/models", response_model=ModelList, tags=["models"])
async def models(st: StateDep, _: OwnerDep) -> ModelList:
    counter = await st.counter.get()
    facts = counter.facts
    owner = "inferq-DEMO (random weights: output is gibberish)" if facts.demo else "inferq"
    card = ModelCard(
        id=facts.model_id,
        created=st.started_at,
        owned_by=owner,
        demo=facts.demo,
        context_length=facts.context_length,
    )
    return ModelList(data=[card])
