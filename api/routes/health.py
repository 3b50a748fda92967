"""Liveness, readiness and the model list."""

from __future__ import annotations

from typing import Any

import redis.exceptions
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.auth import OwnerDep
from api.deps import StateDep
from api.errors import APIError, error_responses
from api.served_adapters import refused_error
from api.status_view import live_workers
from schemas.openai import ModelCard, ModelList

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness")
async def health() -> dict[str, str]:
    """Liveness: the process answers. Says nothing about Redis or workers (see /ready)."""
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Readiness",
    responses={
        200: {"description": "Redis answers and a worker has a loaded engine"},
        503: {"description": "Not ready: the body says which part is missing"},
        **{k: v for k, v in error_responses().items() if k in (401, 429)},
    },
)
async def ready(st: StateDep, _: OwnerDep) -> JSONResponse:
    """Ready: Redis answers and at least one worker child has a loaded engine and beats."""
    body: dict[str, Any] = {"redis": False, "workers": [], "validator": st.counter.ready}
    try:
        await st.redis.ping()
        body["redis"] = True
        body["workers"] = await live_workers(st.redis)
    except (redis.exceptions.RedisError, OSError) as exc:
        body["error"] = f"redis unreachable: {exc}"
    ok = body["redis"] and bool(body["workers"]) and body["validator"]
    body["status"] = "ready" if ok else "not_ready"
    return JSONResponse(body, status_code=200 if ok else 503)


async def _model_card(st: Any) -> ModelCard:
    facts = (await st.counter.get()).facts
    owner = "inferq-DEMO (random weights: output is gibberish)" if facts.demo else "inferq"
    return ModelCard(
        id=facts.model_id,
        created=st.started_at,
        owned_by=owner,
        demo=facts.demo,
        context_length=facts.context_length,
    )


@router.get(
    "/v1/models",
    response_model=ModelList,
    tags=["models"],
    summary="List models",
    responses=error_responses(),
)
async def models(st: StateDep, _: OwnerDep) -> ModelList:
    """The base model, then each LoRA adapter a live worker serves (`parent`: the base)."""
    base = await _model_card(st)
    return ModelList(data=[base, *[_adapter_card(base, a) for a in sorted(await st.adapters.names())]])


def _adapter_card(base: ModelCard, name: str) -> ModelCard:
    return base.model_copy(update={"id": name, "parent": base.id})


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    tags=["models"],
    summary="Get a model",
    responses=error_responses(404),
)
async def model(model_id: str, st: StateDep, _: OwnerDep) -> ModelCard:
    card = await _model_card(st)
    if model_id != card.id and model_id in await st.adapters.names():
        return _adapter_card(card, model_id)
    if model_id != card.id:
        if (reason := await st.adapters.refused(model_id)) is not None:
            raise refused_error(model_id, reason)
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return card
