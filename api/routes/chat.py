"""POST /v1/chat/completions: OpenAI-compatible, backed by the queue."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api import serving_chat as chat
from api.auth import OwnerDep
from api.deps import StateDep
from api.errors import error_responses
from schemas.openai import ChatCompletion, ChatCompletionRequest

router = APIRouter(prefix="/v1/chat", tags=["chat"])


@router.post(
    "/completions",
    response_model=ChatCompletion,
    summary="Create a chat completion (OpenAI-compatible; stream=true for SSE)",
    responses=error_responses(400, 404, 409, 413, 415, 500),
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, st: StateDep, owner: OwnerDep
) -> ChatCompletion | StreamingResponse:
    job = await chat.submit(st, body, owner, publish_tokens=body.stream)
    if body.stream:
        return chat.streaming_response(st, job, body, request)
    return await chat.complete(st, job, request)
