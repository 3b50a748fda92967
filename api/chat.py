"""/v1/chat/completions on top of the queue: submit to the interactive lane, then follow
the job's event stream — to its end (non-streaming) or chunk by chunk (streaming)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api import service
from api.deps import AppState
from api.errors import APIError
from api.streams import read_events
from schemas.jobs import Job
from schemas.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    Usage,
    error_body,
)

logger = logging.getLogger(__name__)

#: Idle blocks are short here: each one is a chance to notice a client that went away.
_BLOCK_MS = 1000


async def submit(
    st: AppState,
    body: ChatCompletionRequest,
    owner: str = "",
    queue: str | None = None,
    publish_tokens: bool = True,
) -> Job:
    """Submit with the app's parts; the interactive lane unless another is named."""
    return await service.submit(
        body,
        queue or st.settings.queue_interactive,
        settings=st.settings,
        store=st.store,
        counter=await st.counter.get(),
        celery=st.celery,
        owner=owner,
        publish_tokens=publish_tokens,
    )


async def _cancel_quietly(st: AppState, job_id: str) -> None:
    """The client left: stop its generation. Shielded, since we run inside a cancelled scope."""
    with anyio.CancelScope(shield=True):
        try:
            await service.cancel(st.store, job_id)
            logger.info("client disconnected; cancelled %s", job_id)
        except APIError:
            pass  # already finished


async def complete(st: AppState, job: Job, request: Request) -> ChatCompletion:
    finished = False
    try:
        async for event in read_events(st.stream_redis, job.id, "0-0", _BLOCK_MS):
            if event is None:
                if await request.is_disconnected():
                    break
                continue
            if event.type == "done":
                finished = True
                return ChatCompletion.model_validate(event.data())
            if event.type == "error":
                finished = True
                err = event.data()
                raise APIError(
                    500,
                    f"Generation failed: {err.get('message')}",
                    type_="server_error",
                    code=str(err.get("code")),
                )
            if event.type == "cancelled":
                finished = True
                raise APIError(409, "The request was cancelled.", code="cancelled")
        raise APIError(499, "Client closed the request.", code="client_closed")
    finally:
        if not finished:
            await _cancel_quietly(st, job.id)


class JobStreamingResponse(StreamingResponse):
    """Runs `on_close` however the response ends. Starlette abandons the body generator
    when the client disconnects (no `aclose`), so its `finally` would run only whenever
    the generator is garbage-collected: too late to stop the GPU."""

    def __init__(
        self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], **kw: Any
    ) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Listen for the disconnect whatever the ASGI spec version: uvicorn drops writes to
        # a closed socket silently, so only `receive()` tells us the client left.
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            await self.on_close()


def streaming_response(
    st: AppState, job: Job, body: ChatCompletionRequest, request: Request
) -> StreamingResponse:
    state = {"finished": False}

    async def on_close() -> None:
        if not state["finished"]:
            await _cancel_quietly(st, job.id)

    return JobStreamingResponse(
        stream_chunks(st, job, body, state),
        on_close,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Inferq-Job-Id": job.id},
    )


async def stream_chunks(
    st: AppState, job: Job, body: ChatCompletionRequest, state: dict[str, bool]
) -> AsyncIterator[str]:
    cid = f"chatcmpl-{job.id.removeprefix('job_')}"
    created = int(job.created_at)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        c = ChatCompletionChunk(id=cid, created=created, model=body.model, choices=choices, usage=usage)
        data = c.model_dump(exclude=None if include_usage else {"usage"})
        return f"data: {json.dumps(data)}\n\n"

    yield chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content="")) for i in range(body.n)])
    async for event in read_events(st.stream_redis, job.id, "0-0", _BLOCK_MS):
        if event is None:
            yield ": keep-alive\n\n"
        elif event.type == "token":
            data = event.data()
            yield chunk([ChunkChoice(index=data["index"], delta=ChunkDelta(content=data["text"]))])
        elif event.type == "done":
            state["finished"] = True
            result = ChatCompletion.model_validate(event.data())
            for ch in result.choices:
                reason = "stop" if ch.finish_reason == "cancelled" else ch.finish_reason
                yield chunk([ChunkChoice(index=ch.index, delta=ChunkDelta(), finish_reason=reason)])
            if include_usage:
                yield chunk([], usage=result.usage)
            yield "data: [DONE]\n\n"
            return
        elif event.type in ("error", "cancelled"):
            state["finished"] = True
            err = event.data() if event.type == "error" else {"message": "cancelled", "code": "cancelled"}
            payload = error_body(
                f"Generation failed: {err.get('message')}", "server_error", None, str(err.get("code"))
            )
            yield f"data: {json.dumps(payload)}\n\n"
            return
