"""The asynchronous job API: submit, poll, follow live, cancel."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from api import listing
from api import serving_chat as chat
from api import submit as service
from api.auth import OwnerDep, ScopeDep
from api.deps import StateDep
from api.errors import APIError, error_responses
from api.streams import read_events
from schemas.jobs import Job, JobList, JobStatus
from schemas.openai import ChatCompletionRequest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=202,
    response_model=Job,
    summary="Submit a chat job",
    responses=error_responses(400, 404, 413, 415),
)
async def create_job(body: ChatCompletionRequest, st: StateDep, owner: OwnerDep) -> Job:
    if body.stream:
        raise APIError(
            400,
            "'stream' is not allowed on /v1/jobs; subscribe to /v1/jobs/{id}/events instead.",
            param="stream",
            code="invalid_value",
        )
    return await chat.submit(st, body, owner, st.settings.queue_jobs, notify="job")


@router.get(
    "",
    response_model=JobList,
    summary="List jobs",
    responses=error_responses(400, 404),
    openapi_extra={
        "parameters": [
            {
                "name": "metadata[KEY]",
                "in": "query",
                "required": False,
                "description": "Only jobs whose metadata has KEY equal to this value (repeatable).",
                "schema": {"type": "string"},
            }
        ]
    },
)
async def list_jobs(
    request: Request,
    st: StateDep,
    scope: ScopeDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
    status: JobStatus | None = None,
    lane: str | None = None,
    batch_id: str | None = None,
) -> JobList:
    """Newest first, like OpenAI's lists: pass the page's `last_id` as `after` for the next.
    Filters: `status`, `lane` (a queue name, any model's), `metadata[key]=value`,
    `batch_id` (that batch's lines). With API keys on, only the caller's own jobs."""
    queues = [st.settings.queue_interactive, st.settings.queue_jobs, st.settings.queue_batch]
    if lane is not None and lane not in queues:
        raise APIError(400, f"Unknown lane '{lane}'; lanes are {', '.join(queues)}.", param="lane")
    if batch_id:
        await st.batches.get(batch_id, scope or "")  # 404 unless the caller's
    meta = {
        k[len("metadata[") : -1]: v
        for k, v in request.query_params.multi_items()
        if k.startswith("metadata[") and k.endswith("]") and len(k) > len("metadata[]")
    }
    flt = listing.JobFilter(status=status, lane=lane, metadata=meta)
    page = await listing.list_jobs(st.redis, scope, limit, after, batch_id, flt)
    return JobList(
        data=page.data,
        has_more=page.has_more,
        first_id=page.data[0].id if page.data else None,
        last_id=page.cursor or (page.data[-1].id if page.data else None),
    )


@router.get("/{job_id}", response_model=Job, summary="Get a job", responses=error_responses(404))
async def get_job(job_id: str, st: StateDep, scope: ScopeDep) -> Job:
    return (await service.get_owned(st.store, job_id, scope)).job


@router.post(
    "/{job_id}/cancel", response_model=Job, summary="Cancel a job", responses=error_responses(404, 409)
)
async def cancel_job(job_id: str, st: StateDep, scope: ScopeDep) -> Job:
    return await service.cancel(st.store, job_id, scope)


@router.get(
    "/{job_id}/events",
    summary="Follow a job's events (SSE)",
    responses=error_responses(400, 404),
    response_class=EventSourceResponse,
)
async def job_events(
    job_id: str,
    request: Request,
    st: StateDep,
    scope: ScopeDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """SSE: `status`, `token`, `reset` events, then one of `done`, `error`, `cancelled`.
    Each event's id is its Redis Stream entry id; reconnect with `Last-Event-ID` to resume."""
    await service.get_owned(st.store, job_id, scope)
    start = last_event_id or "0-0"
    if not _valid_stream_id(start):
        raise APIError(
            400,
            f"Invalid Last-Event-ID '{start}': expected a stream id like 1700000000000-0.",
            param="Last-Event-ID",
            code="invalid_value",
        )

    async def events() -> AsyncIterator[ServerSentEvent]:
        block_ms = int(st.settings.sse_block_s * 1000)
        async for event in read_events(st.stream_redis, job_id, start, block_ms):
            if event is None:
                if await request.is_disconnected():
                    return
                continue
            yield ServerSentEvent(data=json.dumps(event.data()), event=event.type, id=event.id)

    return EventSourceResponse(events(), ping=int(st.settings.sse_block_s), send_timeout=30)


def _valid_stream_id(value: str) -> bool:
    ms, _, seq = value.partition("-")
    return ms.isdigit() and (seq == "" or seq.isdigit())
