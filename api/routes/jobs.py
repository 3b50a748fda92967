"""POST /v1/jobs and GET /v1/jobs/{id}: the asynchronous job API."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api import service
from api.deps import StateDep
from api.errors import APIError
from schemas.jobs import Job
from schemas.openai import ChatCompletionRequest, ErrorResponse

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (the message names the field)"},
    404: {"model": ErrorResponse, "description": "Unknown job or model"},
    503: {"model": ErrorResponse, "description": "Store or queue unavailable"},
}


@router.post("", status_code=202, response_model=Job, responses=_ERRORS)
async def create_job(body: ChatCompletionRequest, st: StateDep) -> Job:
    if body.stream:
        raise APIError(
            400,
            "'stream' is not allowed on /v1/jobs; subscribe to /v1/jobs/{id}/events instead.",
            param="stream",
            code="invalid_value",
        )
    return await service.submit(
        body,
        st.settings.queue_jobs,
        settings=st.settings,
        store=st.store,
        counter=await st.counter.get(),
        celery=st.celery,
    )


@router.get("/{job_id}", response_model=Job, responses=_ERRORS)
async def get_job(job_id: str, st: StateDep) -> Job:
    record = await st.store.get(job_id)
    if record is None:
        raise APIError(
            404,
            f"No job with id '{job_id}' (unknown, or expired after its TTL).",
            param="job_id",
            code="job_not_found",
            type_="not_found_error",
        )
    return record.job
