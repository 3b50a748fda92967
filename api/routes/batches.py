"""OpenAI Batches API, plus `retry` and partial output (our extensions)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.auth import OwnerDep
from api.deps import StateDep
from api.errors import error_responses
from schemas.batches import Batch, BatchCreate, BatchList

router = APIRouter(prefix="/v1/batches", tags=["batches"])


@router.post(
    "", response_model=Batch, summary="Create a batch", responses=error_responses(400, 404, 413, 415)
)
async def create_batch(body: BatchCreate, st: StateDep, owner: OwnerDep) -> Batch:
    return await st.batches.create(body, owner=owner)


@router.get("", response_model=BatchList, summary="List batches", responses=error_responses(400))
async def list_batches(
    st: StateDep, owner: OwnerDep, limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None
) -> BatchList:
    data, more = await st.batches.list_batches(limit, after, owner)
    return BatchList(
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/{batch_id}", response_model=Batch, summary="Get a batch", responses=error_responses(404))
async def get_batch(batch_id: str, st: StateDep, owner: OwnerDep) -> Batch:
    return await st.batches.get(batch_id, owner)


@router.post(
    "/{batch_id}/cancel", response_model=Batch, summary="Cancel a batch", responses=error_responses(404, 409)
)
async def cancel_batch(batch_id: str, st: StateDep, owner: OwnerDep) -> Batch:
    return await st.batches.cancel(batch_id, owner)


@router.post(
    "/{batch_id}/retry",
    response_model=Batch,
    summary="Retry a finished batch's failed lines",
    responses=error_responses(404, 409),
)
async def retry_batch(batch_id: str, st: StateDep, owner: OwnerDep) -> Batch:
    """A new batch made of the failed, cancelled and expired lines of a finished one."""
    return await st.batches.retry(batch_id, owner)


@router.get(
    "/{batch_id}/output", summary="Read a batch's output so far (JSONL)", responses=error_responses(400, 404)
)
async def batch_output(
    batch_id: str,
    st: StateDep,
    owner: OwnerDep,
    kind: Literal["output", "error"] = "output",
    partial: bool = True,
) -> StreamingResponse:
    """The lines finished so far (`partial=true`, also while the batch runs), as JSONL."""
    await st.batches.get(batch_id, owner)

    async def body() -> AsyncIterator[bytes]:
        async for line in st.batches.result_lines(batch_id, output=kind == "output"):
            yield (line + "\n").encode()

    return StreamingResponse(body(), media_type="application/jsonl")
