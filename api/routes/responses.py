"""OpenAI's Responses API: create (foreground or `background`, streamed or not), retrieve
(or stream again from `starting_after`), cancel, delete, list input items."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api import responses
from api import serving_chat as chat
from api.auth import OwnerDep, ScopeDep
from api.deps import AppState, StateDep
from api.errors import error_responses
from api.response_stream import stream_events
from schemas.responses import InputItemList, ResponseCreate, ResponseDeleted, ResponseObject

router = APIRouter(prefix="/v1/responses", tags=["responses"])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _streaming(
    st: AppState, stored: responses.Stored, starting_after: int, stops_job: bool
) -> StreamingResponse:
    """The response's events as SSE. `stops_job`: a foreground stream whose client leaves
    cancels its generation (a background one runs on: its client may come back)."""
    state = {"finished": False}

    async def events() -> AsyncIterator[str]:
        async for chunk in stream_events(st, stored, starting_after):
            yield chunk
        state["finished"] = True

    async def on_close() -> None:
        if stops_job and not state["finished"]:
            await chat.cancel_quietly(st, stored.record.job.id)
        if not stored.meta["echo"]["store"] and state["finished"]:
            await responses.forget(st, await responses.load(st, stored.id, None))

    headers = {**_SSE_HEADERS, "X-Inferq-Job-Id": stored.record.job.id}
    return chat.JobStreamingResponse(events(), on_close, media_type="text/event-stream", headers=headers)


@router.post(
    "",
    response_model=ResponseObject,
    summary="Create a response (OpenAI's Responses API; `background` and `stream` as OpenAI's)",
    responses=error_responses(400, 404, 413, 415),
)
async def create_response(
    body: ResponseCreate, request: Request, st: StateDep, owner: OwnerDep, scope: ScopeDep
) -> ResponseObject | StreamingResponse:
    stored = await responses.create(st, body, owner, scope)
    if body.stream:
        return _streaming(st, stored, -1, stops_job=not body.background)
    if body.background:
        return stored.object()
    await chat.follow_to_end(st, stored.record.job, request)
    answer = await responses.load(st, stored.id, None)
    if not body.store:
        await responses.forget(st, answer)
    return answer.object()


@router.get(
    "/{response_id}",
    response_model=ResponseObject,
    summary="Retrieve a response (stream=true: its events again, after `starting_after`)",
    responses=error_responses(404),
)
async def retrieve_response(
    response_id: str,
    st: StateDep,
    scope: ScopeDep,
    stream: bool = False,
    starting_after: Annotated[int, Query(ge=-1)] = -1,
    include: Annotated[list[str] | None, Query(alias="include[]")] = None,
) -> ResponseObject | StreamingResponse:
    stored = await responses.load(st, response_id, scope)
    if stream:
        return _streaming(st, stored, starting_after, stops_job=False)
    return stored.object()


@router.post(
    "/{response_id}/cancel",
    response_model=ResponseObject,
    summary="Cancel a response (a finished one is returned unchanged)",
    responses=error_responses(404),
)
async def cancel_response(response_id: str, st: StateDep, scope: ScopeDep) -> ResponseObject:
    return (await responses.cancel(st, response_id, scope)).object()


@router.delete(
    "/{response_id}",
    response_model=ResponseDeleted,
    summary="Delete a response (an unfinished one is cancelled first)",
    responses=error_responses(404),
)
async def delete_response(response_id: str, st: StateDep, scope: ScopeDep) -> ResponseDeleted:
    stored = await responses.load(st, response_id, scope)
    await responses.forget(st, stored)
    return ResponseDeleted(id=stored.id)


@router.get(
    "/{response_id}/input_items",
    response_model=InputItemList,
    summary="List a response's input items",
    responses=error_responses(400, 404),
)
async def list_input_items(
    response_id: str,
    st: StateDep,
    scope: ScopeDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> InputItemList:
    stored = await responses.load(st, response_id, scope)
    items, more = responses.input_item_page(stored, limit, after, order)
    return InputItemList(
        data=items,
        first_id=items[0]["id"] if items else None,
        last_id=items[-1]["id"] if items else None,
        has_more=more,
    )
