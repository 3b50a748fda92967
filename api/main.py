"""App factory: `uvicorn --factory api.main:create_app`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics

from api import errors, request_id
from api.batch_dispatch import BatchService
from api.deps import AppState
from api.fleet import CounterHolder, Fleet
from api.guard import RequestGuard
from api.idempotency import PATHS as IDEMPOTENT_PATHS
from api.idempotency import Idempotency
from api.rate_limit import RateHeaders
from api.routes import adapters, chat, files, health, jobs, observe, responses
from api.routes import batches as batch_routes
from api.routes import webhooks as webhook_routes
from api.timing import TimingHeader
from api.webhooks import WebhookDispatcher
from core import redis_conn
from core.audit import AuditLog
from core.auth import configured_hashes
from core.config import Settings, get_settings, version
from core.job_store import AsyncJobStore
from core.storage import LocalStorage
from models.hooks import HookLoadError, hooks_for

logger = logging.getLogger("inferq.api")


def install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs with its JS and CSS from the API itself: FastAPI's default page loads
    them from a CDN and is blank offline, and /docs is the first page `inferq run` points to.
    Swagger UI 5 (from the `fastapi-offline` package, which ships swagger-ui-dist 5's files):
    FastAPI emits OpenAPI 3.1, and Swagger UI 4 refuses it ("Unable to render this definition")."""
    from importlib.resources import files

    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    assets = files("fastapi_offline") / "static"
    app.mount("/docs-assets", StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="inferq API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI documents a 422 on every route with parameters; a bad request here answers
        400 with the OpenAI error body (see `api.errors`), so the 422s would mislead clients."""
        if app.openapi_schema is None:
            doc = plain_openapi()
            for item in doc["paths"].values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            document_idempotency(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_idempotency(doc: dict[str, Any]) -> None:
    """The `Idempotency-Key` header on the routes the middleware serves (api.idempotency),
    which the routes themselves never see."""
    for path in IDEMPOTENT_PATHS:
        op = doc["paths"].get(path, {}).get("post")
        if op is None:
            continue
        op.setdefault("parameters", []).append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "A retry with the same key and body gets the first answer again "
                "(`Idempotent-Replayed: true`); another body: 422; the first still running: "
                "409 or, on asynchronous endpoints, its answer once it comes.",
                "schema": {"type": "string", "maxLength": 255},
            }
        )
        for code, meaning in (
            (409, "The key's first request is still running"),
            (422, "The key was used with another request"),
        ):
            op["responses"].setdefault(
                str(code),
                {
                    "description": meaning,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                    },
                },
            )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if not settings.redis_url:
        raise SystemExit(
            "INFERQ_REDIS_URL (or REDIS_URL) is not set; `inferq run` starts an embedded Valkey."
        )
    try:  # once per process, here: a hook that cannot be loaded stops the API before it serves
        hooks_for(settings.hooks)
    except HookLoadError as exc:
        raise SystemExit(str(exc)) from None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from tasks.app import app as celery_app  # torch-free; imported late to keep module import cheap

        client = redis_conn.async_client(
            settings.redis_url,
            master=settings.redis_sentinel_master,
            decode_responses=True,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        stream_client = redis_conn.async_client(
            settings.redis_url,
            master=settings.redis_sentinel_master,
            decode_responses=True,
            socket_timeout=settings.sse_block_s + 10,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        counter = CounterHolder(settings)
        counter.start()
        fleet = Fleet(client, settings, counter)
        storage = LocalStorage(settings.files_path)
        store = AsyncJobStore(
            client,
            settings.result_ttl_s,
            AuditLog(settings.audit_log, settings.audit_content),
            # WAIT for up to half the Redis timeout: the socket's own timeout must not come first
            wait_replicas=(settings.redis_wait_replicas, int(settings.redis_timeout_s * 500)),
        )
        batches = BatchService(client, store, storage, settings, celery_app, fleet)
        app.state.inferq = AppState(
            settings=settings,
            redis=client,
            stream_redis=stream_client,
            store=store,
            storage=storage,
            batches=batches,
            celery=celery_app,
            started_at=int(time.time()),
            key_hashes=configured_hashes([*settings.api_keys, *settings.admin_keys]),
            fleet=fleet,
        )
        resumer = asyncio.get_running_loop().create_task(batches.resume_all())
        app.state.webhooks = webhook_dispatcher = WebhookDispatcher(client, stream_client, settings)
        webhook_dispatcher.start()
        try:
            yield
        finally:
            resumer.cancel()
            await webhook_dispatcher.stop()
            await batches.stop()
            await client.aclose()
            await stream_client.aclose()

    app = FastAPI(
        title="inferq",
        version=version(),
        lifespan=lifespan,
        description="Queue-backed, OpenAI-compatible inference on ms-swift workers.",
        docs_url=None,  # served below, from local assets
        redoc_url=None,
    )
    errors.install(app)
    install_docs(app)

    app.add_middleware(RateHeaders)  # a limited key's x-ratelimit-* on every answer
    app.add_middleware(Idempotency)  # inside the guard: its size checks come first
    app.add_middleware(RequestGuard, settings=settings)
    # HTTP metrics in a registry of this app's own (tests build many apps in one process)
    # Two metrics, not the instrumentator's five: request and response sizes and a second,
    # finer latency histogram cost CPU on every request, and the API's is part of each job's
    app.state.http_metrics = registry = CollectorRegistry()
    instrumentator = Instrumentator(should_group_status_codes=False, registry=registry)
    instrumentator.add(http_metrics.requests(registry=registry), http_metrics.latency(registry=registry))
    instrumentator.instrument(app)
    app.add_middleware(TimingHeader)
    request_id.install(app)  # around all of the above, and around Starlette's 500s

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(files.router)
    app.include_router(batch_routes.router)
    app.include_router(observe.router)
    app.include_router(adapters.router)
    app.include_router(webhook_routes.router)
    return app
