"""The API's side of the hooks (models.hooks): the model's default system prompt, then the
`before` hooks, on every request before it is counted and queued.

Why before `prepare`: a hook or the system prompt may change the messages, and the context
check and the prompt count must see what the engine will run. Chat completions, /v1/jobs and
responses pass here through `api.submit.submit`; batch lines through the batch dispatcher.
"""

from __future__ import annotations

import logging

import redis.asyncio as aredis
from redis.exceptions import RedisError

from api.errors import APIError
from core import metrics
from core.config import Settings
from models.hooks import HookFailed, Timing, hooks_for, with_system_prompt
from schemas.openai import ChatCompletionRequest

logger = logging.getLogger(__name__)


def as_api_error(exc: HookFailed) -> APIError:
    """A refusal is the client's to read (400 with the hook's message); a hook that broke is
    the server's fault (500 naming the hook and its exception)."""
    if exc.refused:
        return APIError(400, exc.message, param="messages", code=exc.code)
    return APIError(500, exc.message, code=exc.code, type_="server_error")


async def screen(
    request: ChatCompletionRequest, settings: Settings, r: aredis.Redis, ttl: int
) -> ChatCompletionRequest:
    """The request as the job will hold it, or APIError (`refused_by_hook` 400, `hook_failed`
    500). Each hook's time goes to the metrics hash (`ttl`: the hash's)."""
    request = with_system_prompt(request, settings.system_prompts)
    hooks = hooks_for(settings.hooks)
    if not hooks.has_before:
        return request
    timings: list[Timing] = []
    try:
        return await hooks.run_before(request, timings)
    except HookFailed as exc:
        if not exc.refused:
            logger.error("%s", exc.message)
        raise as_api_error(exc) from exc
    finally:
        await _record(r, timings, ttl)


async def _record(r: aredis.Redis, timings: list[Timing], ttl: int) -> None:
    """Best effort: a metrics write that fails must not change the request's answer."""
    if not timings:
        return
    try:
        async with r.pipeline(transaction=False) as pipe:
            for t in timings:
                metrics.observe_hook(pipe, t.stage, t.hook, t.seconds, t.outcome, ttl)
            await pipe.execute()
    except RedisError as exc:
        logger.warning("hook metrics not written: %s", exc)
