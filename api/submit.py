"""Submission logic: validate against the served model, record the job, enqueue its id.

Routes call this and only translate HTTP; tests call it directly.
"""

from __future__ import annotations

import logging
import re
import time
import weakref

import anyio
from celery import Celery

from api.errors import APIError
from api.fleet import Fleet
from api.hooks import screen
from api.prompt_bound import PromptBound
from api.publish import task_message
from core import lanes
from core.config import Settings
from core.job_store import NO_TOKENS, AsyncJobStore, JobRecord
from core.redis_conn import NotReplicated
from models.prompts import PromptCounter
from models.spec import ModelFacts
from schemas.grammar import GrammarError, check_request_grammar
from schemas.jobs import Job, JobStatus
from schemas.openai import ChatCompletionRequest
from tasks.app import RUN_JOB

logger = logging.getLogger(__name__)

#: Prompts up to this many characters are counted on the event loop (~0.25 ms for a short
#: chat): a thread hand-off costs about as much. Longer ones go to a thread.
INLINE_COUNT_CHARS = 4096
#: how ms-swift's template refuses a prompt longer than its max_length (4.6)
TOO_LONG = re.compile(r"length of row\((?P<used>\d+)\) is larger than the max_length\(\d+\)")


async def prepare(
    request: ChatCompletionRequest, settings: Settings, counter: PromptCounter
) -> tuple[ChatCompletionRequest, int]:
    """Refuse what the engine cannot do; fill in the effective `max_tokens`. The model was
    routed first (api.fleet): `counter` is its base model's."""
    facts = counter.facts
    if request.n > settings.max_n:
        raise APIError(
            400,
            f"Invalid value for 'n': {request.n} is above the limit of {settings.max_n}.",
            param="n",
            code="invalid_value",
        )
    limit = request.token_limit
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    if limit is not None and limit > settings.max_tokens_limit:
        raise APIError(
            400,
            f"Invalid value for '{param}': {limit} is above the limit of {settings.max_tokens_limit}.",
            param=param,
            code="invalid_value",
        )
    opts = request.inferq
    if opts and opts.timeout_s and opts.timeout_s > settings.max_job_timeout_s:
        raise APIError(
            400,
            f"Invalid value for 'inferq.timeout_s': {opts.timeout_s} is above the server's limit "
            f"of {settings.max_job_timeout_s} seconds.",
            param="inferq.timeout_s",
            code="invalid_value",
        )
    check_structured(request, facts)
    messages = request.engine_messages()
    tools = request.tools_for_engine()
    bound = prompt_bound(counter) if tools is None else None
    needed = limit if limit is not None else settings.default_max_tokens
    upper = bound(messages) if bound is not None else None
    if upper is not None and upper + needed <= facts.context_length:
        # it fits for certain: the exact count would decide nothing (the worker reports it)
        return _effective(request, settings, limit, facts.context_length - upper), upper
    try:
        if sum(len(m["content"]) for m in messages) <= INLINE_COUNT_CHARS and not tools:
            prompt_tokens = counter.count_prompt_tokens(messages, tools)
        else:
            prompt_tokens = await anyio.to_thread.run_sync(counter.count_prompt_tokens, messages, tools)
    except Exception as exc:  # the template refused the conversation
        too_long = TOO_LONG.search(str(exc))
        if too_long is None:
            raise APIError(
                400, f"Invalid value for 'messages': {exc}", param="messages", code="invalid_value"
            ) from exc
        # ms-swift's own words for a prompt over its max_length: the context check below answers
        prompt_tokens = int(too_long["used"])
    room = facts.context_length - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {facts.context_length} tokens; "
            f"the messages use {prompt_tokens}.",
            param="messages",
            code="context_length_exceeded",
        )
    if limit is not None and limit > room:
        raise APIError(
            400,
            f"This model's maximum context length is {facts.context_length} tokens; "
            f"the messages use {prompt_tokens} and '{param}' asks for {limit}.",
            param=param,
            code="context_length_exceeded",
        )
    return _effective(request, settings, limit, room), prompt_tokens


def check_structured(request: ChatCompletionRequest, facts: ModelFacts) -> None:
    """Tools need a template with a tool-call format; every JSON schema (response format,
    tool parameters) must be one the grammar compiler takes: refused here, before the job
    is queued, not as a failed job later."""
    if request.calls_tools and facts.tool_format is None:
        raise APIError(
            400,
            f"The model '{facts.model_id}' has no tool-call format in its template; tools work "
            "with templates that use hermes tool calls (Qwen2.5, Qwen3, ...).",
            param="tools",
            code="invalid_value",
        )
    if facts.vocab_size:
        for token in request.logit_bias or {}:
            if int(token) >= facts.vocab_size:
                raise APIError(
                    400,
                    f"Invalid value for 'logit_bias': token {token} is outside the vocabulary "
                    f"(ids 0-{facts.vocab_size - 1}).",
                    param="logit_bias",
                    code="invalid_value",
                )
    try:
        check_request_grammar(
            request.response_format, request.tools, request.tool_choice, request.parallel_tool_calls
        )
    except GrammarError as exc:
        raise APIError(
            400, f"Invalid value for '{exc.param}': {exc}", param=exc.param, code="invalid_value"
        ) from exc


def _effective(
    request: ChatCompletionRequest, settings: Settings, limit: int | None, room: int
) -> ChatCompletionRequest:
    effective = limit if limit is not None else min(settings.default_max_tokens, room)
    return request.model_copy(update={"max_tokens": effective, "max_completion_tokens": None})


#: by counter, weakly: a counter loaded again (after a failed load) is measured again,
#: never mistaken for an old one whose id it happens to reuse
_bounds: weakref.WeakKeyDictionary[PromptCounter, PromptBound | None] = weakref.WeakKeyDictionary()


def prompt_bound(counter: PromptCounter) -> PromptBound | None:
    """The counter's cheap bound, measured once (None: its template refused empty messages)."""
    if counter not in _bounds:
        try:
            _bounds[counter] = PromptBound.measure(counter.count_prompt_tokens)
        except Exception as exc:
            logger.info("no cheap prompt bound for this template (%s): every prompt is counted", exc)
            _bounds[counter] = None
    return _bounds[counter]


def job_limits(request: ChatCompletionRequest, settings: Settings, expires: bool = True) -> dict[str, str]:
    """Record fields for the job's time limit and queue expiry."""
    opts = request.inferq
    timeout = (opts.timeout_s if opts and opts.timeout_s else None) or settings.job_timeout_s
    out = {"timeout_s": repr(timeout)}
    if expires:
        after = (opts.expires_after_s if opts and opts.expires_after_s else None) or settings.queue_expiry_s
        out["expires_at"] = repr(time.time() + after)
    return out


async def reserve(store: AsyncJobStore, owner: str, units: int, settings: Settings) -> None:
    if await store.reserve_active(owner, units, settings.max_active_per_key) is None:
        raise APIError(
            429,
            f"This key's unfinished jobs would exceed the limit of {settings.max_active_per_key}.",
            code="too_many_active_jobs",
            type_="rate_limit_error",
            headers={"Retry-After": "10"},
        )


async def submit(
    request: ChatCompletionRequest,
    queue: str,
    *,
    settings: Settings,
    store: AsyncJobStore,
    fleet: Fleet,
    celery: Celery,
    owner: str = "",
    publish_tokens: bool = True,
    notify: str = "",
    fields: dict[str, str] | None = None,
) -> Job:
    """`queue`: the lane setting (`settings.queue_jobs`, ...); the job goes to that lane of
    its model's base model (core.lanes), which only that model's workers consume.
    `publish_tokens` False: the caller waits for the result only (a non-stream chat
    request), so the worker writes no token events for it. `notify`: 'job' or 'response',
    the webhook events its end is announced as (none for chat requests and batch lines,
    whose callers hear of the end otherwise). `fields`: more record fields to write."""
    request = await screen(request, settings, store.r, store.ttl)  # system prompt, before-hooks
    base = await fleet.route(request.model)
    prepared, prompt_tokens = await prepare(request, settings, await fleet.counter(base))
    lane = lanes.lane(queue, base)
    await reserve(store, owner, 1, settings)
    limits: dict[str, str] = job_limits(prepared, settings)
    if not publish_tokens:
        limits[NO_TOKENS[0]] = NO_TOKENS[1]
    try:
        job = await store.create(
            prepared,
            lane,
            prompt_tokens,
            {**limits, **(fields or {}), "owner": owner, **({"notify": notify} if notify else {})},
            message=lambda job_id: task_message(celery, RUN_JOB, job_id, lane, request.model),
        )
    except NotReplicated:
        raise  # a 503, yet the job exists and will run: its end releases its count
    except Exception:
        await store.release_active(owner, 1)
        raise
    return job


async def get_owned(store: AsyncJobStore, job_id: str, owner: str | None) -> JobRecord:
    """The job, if this caller may see it (`owner` None: no keys configured)."""
    record = await store.get(job_id)
    if record is None or (owner is not None and record.owner != owner):
        raise not_found(job_id)
    return record


async def cancel(store: AsyncJobStore, job_id: str, owner: str | None = None) -> Job:
    """Queued: cancelled at once and never runs. Running: the worker's stopping criterion
    sees the flag within a step and ends the job `cancelled`. Finished: 409."""
    record = await get_owned(store, job_id, owner)
    if record.status.terminal:
        raise APIError(
            409,
            f"Job '{job_id}' already finished ({record.status.value}); nothing to cancel.",
            param="job_id",
            code="job_finished",
        )
    await store.request_cancel(job_id)
    if record.status is JobStatus.QUEUED:
        await store.transition(job_id, JobStatus.CANCELLED)
    fresh = await store.get(job_id)
    return fresh.job if fresh else record.job


def not_found(job_id: str) -> APIError:
    return APIError(
        404,
        f"No job with id '{job_id}' (unknown, or expired after its TTL).",
        param="job_id",
        code="job_not_found",
        type_="not_found_error",
    )
