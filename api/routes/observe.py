"""GET /metrics (Prometheus) and GET /status (the same numbers as JSON, for `inferq status`
and `inferq top`).

Who may read them: clients on loopback freely (the Prometheus of a single host, the CLI),
others with `Authorization: Bearer $INFERQ_METRICS_TOKEN`. Not the API keys: a scraper is
not a tenant, and its token should not be able to submit jobs."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api import status_view as observe
from api.auth import bearer_token
from api.deps import StateDep
from api.errors import APIError

router = APIRouter(tags=["observability"])

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_access(request: Request, token: str) -> None:
    host = request.client.host if request.client else ""
    if host in _LOOPBACK or host.startswith("127."):
        return
    if token and hmac.compare_digest(bearer_token(request), token):
        return
    hint = "send 'Authorization: Bearer <INFERQ_METRICS_TOKEN>'" if token else "set INFERQ_METRICS_TOKEN"
    raise APIError(
        401,
        f"Metrics are open to loopback clients only; from elsewhere {hint}.",
        code="metrics_token_required",
        type_="authentication_error",
        headers={"WWW-Authenticate": "Bearer"},
    )


_ERRORS: dict[int | str, dict[str, Any]] = {401: {"description": "Not loopback, and no valid metrics token"}}


@router.get("/metrics", summary="Prometheus metrics of the whole system", responses=_ERRORS)
async def metrics(request: Request, st: StateDep) -> Response:
    """Queue depth, finished jobs, latencies and batch rows from the job store (every
    worker's), live workers from their heartbeats, and this API process's HTTP metrics."""
    check_access(request, st.settings.metrics_token)
    view = await observe.read(st.redis, st.settings.queues)
    return Response(observe.render(view, request.app.state.http_metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/status", summary="The system's state as JSON (inferq status)", responses=_ERRORS)
async def status(request: Request, st: StateDep) -> JSONResponse:
    check_access(request, st.settings.metrics_token)
    return JSONResponse(observe.status(await observe.read(st.redis, st.settings.queues)))
