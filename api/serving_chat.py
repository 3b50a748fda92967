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

from api import submit as service
from api.chunks import ChoiceStream
from api.deps import AppState
from api.errors import APIError
from api.streams import TERMINAL_EVENTS, Event, read_events
from models.prompts import PromptCounter
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


async def submit(
    st: AppState,
    body: ChatCompletionRequest,
    owner: str = "",
    queue: str | None = None,
    publish_tokens: bool = True,
    notify: str = "",
    fields: dict[str, str] | None = None,
) -> Job:
    """Submit with the app's parts; the interactive lane unless another is named."""
    return await service.submit(
        body,
        queue or st.settings.queue_interactive,
        settings=st.settings,
        store=st.store,
        fleet=st.fleet,
        celery=st.celery,
        owner=owner,
        publish_tokens=publish_tokens,
        notify=notify,
        fields=fields,
    )


async def cancel_quietly(st: AppState, job_id: str) -> None:
    """The client left: stop its generation. Shielded, since we run inside a cancelled scope."""
    with anyio.CancelScope(shield=True):
        try:
            await service.cancel(st.store, job_id)
            logger.info("client disconnected; cancelled %s", job_id)
        except APIError:
            pass  # already finished


def _outcome(event: Event) -> ChatCompletion | APIError:
    """A job's final event as the answer or the error to raise."""
    if event.type == "done":
        return ChatCompletion.model_validate(event.data())
    if event.type == "error":
        err = event.data()
        return APIError(
            500,
            f"Generation failed: {err.get('message')}",
            type_="server_error",
            code=str(err.get("code")),
        )
    return APIError(409, "The request was cancelled.", code="cancelled")


async def _terminal_event(st: AppState, job: Job) -> Event | None:
    block_ms = int(st.settings.sse_block_s * 1000)  # the client's leaving is seen by `receive`
    async for event in read_events(st.stream_redis, job.id, "0-0", block_ms):
        if event is not None and event.type in TERMINAL_EVENTS:
            return event
    return None


async def follow_to_end(st: AppState, job: Job, request: Request) -> Event:
    """Wait for the job's final event, not its tokens (a non-stream job writes none). Why a
    listener for the client's disconnect instead of short blocking reads that check it: the
    reads woke every waiting request once a second, a cost that grew with waiting time, not
    with jobs; now a waiting request costs nothing until its job ends or its client leaves.
    A client that leaves stops the generation (499)."""
    outcome: Event | None = None
    failure: Exception | None = None  # raised as itself, not in the task group's ExceptionGroup

    async def wait_final() -> None:
        nonlocal outcome, failure
        try:
            outcome = await _terminal_event(st, job)
        except Exception as exc:  # the store went away: its own handler answers 503
            failure = exc

    try:
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(watch_disconnect)
            await wait_final()
            tg.cancel_scope.cancel()
    finally:
        if outcome is None:  # the client left (or the store failed): stop the generation
            await cancel_quietly(st, job.id)
    if failure is not None:
        raise failure
    if outcome is None:
        raise APIError(499, "Client closed the request.", code="client_closed")
    return outcome


async def complete(st: AppState, job: Job, request: Request) -> ChatCompletion:
    """The chat answer of a job, once it ended (an error or a cancel raised as such)."""
    outcome = _outcome(await follow_to_end(st, job, request))
    if isinstance(outcome, APIError):
        raise outcome
    return outcome


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
            await cancel_quietly(st, job.id)

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
    opts = body.stream_options
    running = await RunningUsage.start(st, body) if opts and opts.continuous_usage_stats else None
    include_usage = bool(opts and (opts.include_usage or opts.continuous_usage_stats))
    views = [ChoiceStream(i, body.calls_tools) for i in range(body.n)]

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        if usage is None and running is not None:
            usage = running.usage()
        c = ChatCompletionChunk(id=cid, created=created, model=body.model, choices=choices, usage=usage)
        data = c.model_dump(exclude=None if include_usage else {"usage"})
        return f"data: {json.dumps(data)}\n\n"

    yield chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content="")) for i in range(body.n)])
    keep_alive_ms = int(st.settings.sse_block_s * 1000)
    async for event in read_events(st.stream_redis, job.id, "0-0", keep_alive_ms):
        if event is None:
            yield ": keep-alive\n\n"
        elif event.type == "token":
            data = event.data()
            if running is not None:
                running.add(data["text"])
            if text := views[data["index"]].delta(data["text"]):
                yield chunk([ChunkChoice(index=data["index"], delta=ChunkDelta(content=text))])
        elif event.type == "done":
            state["finished"] = True
            result = ChatCompletion.model_validate(event.data())
            for ch in result.choices:
                for part in views[ch.index].final(ch):
                    yield chunk([part], usage=result.usage if running is not None else None)
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


class RunningUsage:
    """vLLM's `continuous_usage_stats`: `usage` on every chunk. The prompt is counted exactly
    (once); completion tokens so far are the token events' texts, each tokenized as it comes
    (a token split across two events may count twice until the final chunk, whose usage is
    exact)."""

    def __init__(self, counter: PromptCounter, prompt_tokens: int) -> None:
        self.counter = counter
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def add(self, delta: str) -> None:
        """A token event's text, counted once (on the event loop: a few microseconds)."""
        self.completion_tokens += self.counter.count_text_tokens(delta)

    @classmethod
    async def start(cls, st: AppState, body: ChatCompletionRequest) -> RunningUsage:
        counter = await st.fleet.counter(await st.fleet.route(body.model))
        messages = body.engine_messages()
        prompt = await anyio.to_thread.run_sync(
            counter.count_prompt_tokens, messages, body.tools_for_engine()
        )
        return cls(counter, prompt)

    def usage(self) -> Usage:
        done = self.completion_tokens
        return Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done
        )
