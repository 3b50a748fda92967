"""Liveness, readiness and the model list."""

from __future__ import annotations

from typing import Any

import redis.exceptions
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.auth import OwnerDep
from api.deps import AppState, StateDep
from api.errors import APIError, error_responses
from api.fleet import Served, refused_error
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
    body: dict[str, Any] = {"redis": False, "workers": [], "validator": st.fleet.own.ready}
    try:
        await st.redis.ping()
        body["redis"] = True
        body["workers"] = await live_workers(st.redis)
    except (redis.exceptions.RedisError, OSError) as exc:
        body["error"] = f"redis unreachable: {exc}"
    ok = body["redis"] and bool(body["workers"]) and body["validator"]
    body["status"] = "ready" if ok else "not_ready"
    return JSONResponse(body, status_code=200 if ok else 503)


def _card(st: AppState, served: Served) -> ModelCard:
    owner = "inferq-DEMO (random weights: output is gibberish)" if served.demo else "inferq"
    return ModelCard(
        id=served.id,
        created=st.started_at,
        owned_by=owner,
        demo=served.demo,
        context_length=served.context_length,
        parent=served.parent or None,
        workers=served.workers,
    )


async def _own_card(st: AppState) -> ModelCard:
    """The model this API was started with, listed even while no worker serves it."""
    facts = (await st.fleet.own.get()).facts
    own = Served(facts.model_id, 0, context_length=facts.context_length, demo=facts.demo)
    return _card(st, own)


@router.get(
    "/v1/models",
    response_model=ModelList,
    tags=["models"],
    summary="List models",
    responses=error_responses(),
)
async def models(st: StateDep, _: OwnerDep) -> ModelList:
    """Every model a live worker serves, base models first, then LoRA adapters (`parent`:
    the base), each with `workers`, how many live workers serve it; the model this API was
    started with comes first whether or not a worker serves it now."""
    cards = [_card(st, s) for s in await st.fleet.served()]
    own = st.settings.model_id
    if not any(c.id == own for c in cards):
        cards.insert(0, await _own_card(st))
    else:
        cards.sort(key=lambda c: c.id != own)  # stable: the rest keep their order
    return ModelList(data=cards)


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    tags=["models"],
    summary="Get a model",
    responses=error_responses(404),
)
async def model(model_id: str, st: StateDep, _: OwnerDep) -> ModelCard:
    """A model served now, or one served lately (`workers: 0`); a refused adapter's 404 says why."""
    if (served := await st.fleet.find(model_id)) is not None:
        return _card(st, served)
    if model_id == st.settings.model_id:
        return await _own_card(st)
    if (reason := await st.fleet.refused(model_id)) is not None:
        raise refused_error(model_id, reason)
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
