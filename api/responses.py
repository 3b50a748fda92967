"""The Responses API on top of the queue: a response is a chat job whose record also holds
what the response adds (its input items, the conversation so far, the fields a response
object repeats), under the record field `response`.

Why nothing else is stored: status, output, usage, cancel, recovery and the event stream
are the job's, so a background response survives an API restart as any job does, and a
stream read again after one (`starting_after`) is rebuilt from the job's event stream."""

from __future__ import annotations

import json
import uuid
from typing import Any, cast

import anyio
from pydantic import ValidationError

from api import serving_chat as chat
from api import submit as service
from api.deps import AppState
from api.errors import APIError
from api.streams import read_events
from core import keys
from core.job_store import JobRecord, decode
from schemas.jobs import JobStatus
from schemas.openai import ChatCompletion
from schemas.responses import (
    MessageItem,
    ResponseCreate,
    ResponseError,
    ResponseObject,
    answer_messages,
    chat_request,
    conversation_messages,
    echo_fields,
    job_id_of,
    output_items,
    response_id,
    usage,
)

#: chat request fields as a Responses client knows them (a 400 names what the client sent)
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}
#: how long cancel waits for a running response's worker to stop it, before answering
CANCEL_WAIT_S = 10.0


def _param(param: str | None) -> str | None:
    """The client's field a chat field came from (not the chat message it became)."""
    if param is None:
        return None
    for chat_name, name in _PARAMS.items():
        if param == chat_name or param.startswith((chat_name + ".", chat_name + "[")):
            return name
    return param


def renamed(exc: APIError) -> APIError:
    """A chat-shaped 400 (from the shared submission checks) in the Responses API's words."""
    message = exc.message
    for chat_name, name in _PARAMS.items():
        message = message.replace(f"'{chat_name}'", f"'{name}'")
    return APIError(
        exc.status, message, param=_param(exc.param), code=exc.code, type_=exc.type, headers=exc.headers
    )


class Stored:
    """A response as read back: its job record and what the response added to it."""

    def __init__(self, record: JobRecord, meta: dict[str, Any]) -> None:
        self.record = record
        self.meta = meta

    @property
    def id(self) -> str:
        return response_id(self.record.job.id)

    @property
    def terminal(self) -> bool:
        return self.record.status.terminal

    def result(self) -> ChatCompletion | None:
        return self.record.job.result

    def object(self) -> ResponseObject:
        return response_object(self.record, self.meta)


async def load(st: AppState, rid: str, owner: str | None) -> Stored:
    """The response, if this caller may see it; 404 for an unknown, expired, deleted or
    unstored one, for a job that is not a response, and for another key's."""
    raw = cast(dict[str, str], await st.redis.hgetall(keys.job(job_id_of(rid))))
    record = decode(raw) if raw.get("response") and not raw.get("deleted") else None
    if record is None or (owner is not None and record.owner != owner):
        raise APIError(
            404,
            f"No response with id '{rid}' (unknown, not stored, deleted, or expired after its TTL).",
            param="response_id",
            code="response_not_found",
            type_="not_found_error",
        )
    return Stored(record, json.loads(raw["response"]))


def response_object(record: JobRecord, meta: dict[str, Any]) -> ResponseObject:
    job = record.job
    result = job.result
    status, details = _status(record.status, result)
    error = None
    if job.error is not None:
        error = ResponseError(code=job.error.code, message=job.error.message)
    elif record.status is JobStatus.EXPIRED:
        error = ResponseError(code="expired", message="The response waited in the queue past its expiry.")
    return ResponseObject(
        id=response_id(job.id),
        created_at=int(job.created_at),
        status=status,
        completed_at=int(job.finished_at) if status == "completed" and job.finished_at else None,
        error=error,
        incomplete_details=details,
        model=job.model,
        output=output_items(job.id, result) if result is not None and result.choices else [],
        usage=usage(result),
        **meta["echo"],
    )


def _status(status: JobStatus, result: ChatCompletion | None) -> tuple[Any, dict[str, str] | None]:
    if status is JobStatus.QUEUED:
        return "queued", None
    if status is JobStatus.RUNNING:
        return "in_progress", None
    if status is JobStatus.SUCCEEDED:
        if result is not None and result.choices and result.choices[0].finish_reason == "length":
            return "incomplete", {"reason": "max_output_tokens"}
        return "completed", None
    if status is JobStatus.CANCELLED:
        return "cancelled", None
    return "failed", None


async def _history(st: AppState, previous: str | None, owner: str | None) -> list[dict[str, Any]]:
    """The conversation a response continues: the earlier one's (without its instructions,
    as OpenAI does) and its answer."""
    if previous is None:
        return []
    try:
        prior = await load(st, previous, owner)
    except APIError as exc:
        exc.param = "previous_response_id"
        raise
    result = prior.result()
    if prior.record.status is not JobStatus.SUCCEEDED or result is None:
        raise APIError(
            400,
            f"Previous response '{previous}' is {prior.object().status}; only a finished "
            "(completed or incomplete) response can be continued.",
            param="previous_response_id",
            code="invalid_value",
        )
    return [*prior.meta["conversation"], *answer_messages(result)]


def _input_items(body: ResponseCreate) -> list[dict[str, Any]]:
    """The input items as `input_items` lists them: each with an id and a status."""
    out = []
    for item in body.input_items():
        data = item.model_dump(exclude_none=True)
        data.setdefault("id", f"{'msg' if isinstance(item, MessageItem) else 'item'}_{uuid.uuid4().hex}")
        data["status"] = "completed"
        if isinstance(item, MessageItem) and isinstance(item.content, str):
            data["content"] = [{"type": "input_text", "text": item.content}]
        out.append(data)
    return out


async def create(st: AppState, body: ResponseCreate, owner: str, scope: str | None) -> Stored:
    """Submit the response's job: the jobs lane in background, the interactive lane when a
    client waits for it."""
    items = body.input_items()
    conversation = [*await _history(st, body.previous_response_id, scope), *conversation_messages(items)]
    try:
        request = chat_request(body, conversation)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise APIError(
            400,
            f"Invalid value for 'input': {str(first.get('msg', '')).removeprefix('Value error, ')}",
            param="input",
            code="invalid_value",
        ) from exc
    meta = {"echo": echo_fields(body), "conversation": conversation, "input_items": _input_items(body)}
    try:
        job = await chat.submit(
            st,
            request,
            owner,
            st.settings.queue_jobs if body.background else None,
            publish_tokens=body.stream or body.background,
            notify="response",
            fields={"response": json.dumps(meta)},
        )
    except APIError as exc:
        raise renamed(exc) from exc
    return await load(st, response_id(job.id), scope)


async def wait_end(st: AppState, stored: Stored, timeout: float) -> Stored:
    """The response once its job ended, or as it is after `timeout` seconds."""
    block_ms = int(min(st.settings.sse_block_s, timeout) * 1000)
    with anyio.move_on_after(timeout):
        async for event in read_events(st.stream_redis, stored.record.job.id, "0-0", block_ms):
            if event is not None and event.type in ("done", "error", "cancelled"):
                break
    return await load(st, stored.id, None)


async def cancel(st: AppState, rid: str, scope: str | None) -> Stored:
    """Cancel a response: a finished one is returned as it is (cancel is idempotent)."""
    stored = await load(st, rid, scope)
    if stored.terminal:
        return stored
    try:
        await service.cancel(st.store, stored.record.job.id, scope)
    except APIError as exc:
        if exc.code != "job_finished":  # it ended meanwhile: answer it as it ended
            raise
    return await wait_end(st, stored, CANCEL_WAIT_S)


async def forget(st: AppState, stored: Stored) -> None:
    """Remove a finished response's job and its events; an unfinished one is cancelled and
    hidden (404 from now on) and its record goes with its TTL, once its worker let go."""
    job_id = stored.record.job.id
    if not stored.terminal:
        await chat.cancel_quietly(st, job_id)
        await st.redis.hset(keys.job(job_id), "deleted", "1")
        return
    index = keys.owner_jobs(stored.record.owner) if stored.record.owner else keys.JOB_INDEX
    async with st.redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.job(job_id), keys.job_events(job_id), keys.cancel(job_id))
        pipe.zrem(index, job_id)
        await pipe.execute()


def input_item_page(
    stored: Stored, limit: int, after: str | None, order: str
) -> tuple[list[dict[str, Any]], bool]:
    items: list[dict[str, Any]] = list(stored.meta.get("input_items", []))
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i.get("id") for i in items]
        if after not in ids:
            raise APIError(400, f"No input item with id '{after}' in this response.", param="after")
        items = items[ids.index(after) + 1 :]
    return items[:limit], len(items) > limit
