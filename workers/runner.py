"""Running one job: the logic behind the Celery task, callable without Celery.

Idempotence lives here: a job that is already terminal is skipped, and the final write
goes through the state machine, which refuses to overwrite a finished job. A redelivered
message therefore can never produce a second result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from core import batch_lines, keys
from core.jobs import BatchLine, JobRecord, JobStore
from schemas.jobs import JobError, JobStatus
from schemas.openai import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage
from workers.engine import Engine, GenParams, GenRequest, GenResult
from workers.streaming import StreamSink, Target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    status: JobStatus | None
    skipped: bool = False


def gen_params(request: ChatCompletionRequest, default_max_tokens: int) -> GenParams:
    return GenParams(
        max_tokens=request.token_limit or default_max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=tuple(request.stop_list),
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
    )


def gen_requests(job_id: str, request: ChatCompletionRequest, default_max_tokens: int) -> list[GenRequest]:
    """`n` choices become `n` sibling requests: ms-swift's own `n` breaks its streaming path,
    and siblings batch together anyway."""
    messages = [m.for_engine() for m in request.messages]
    params = gen_params(request, default_max_tokens)
    return [GenRequest(messages=messages, params=params, tag=f"{job_id}#{i}") for i in range(request.n)]


def build_completion(job_id: str, model: str, results: list[GenResult]) -> ChatCompletion:
    choices = [
        Choice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason)
        for i, r in enumerate(results)
    ]
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    return ChatCompletion(
        id=f"chatcmpl-{job_id.removeprefix('job_')}",
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion),
    )


def _batch_line(
    record: JobRecord,
    ttl: int,
    *,
    completion: ChatCompletion | None = None,
    error: JobError | None = None,
) -> BatchLine | None:
    """The output/error-file line a batch job writes together with its final status
    (no completion and no error: the job was cancelled)."""
    if not record.batch_id:
        return None
    job_id, custom_id = record.job.id, record.custom_id
    if completion is not None:
        u = completion.usage
        text = batch_lines.success(custom_id, job_id, completion.model_dump())
        return BatchLine(record.batch_id, text, True, "completed", ttl, u.prompt_tokens, u.completion_tokens)
    if error is not None:
        text = batch_lines.request_failure(custom_id, job_id, 500, error.message, error.code, "server_error")
        return BatchLine(record.batch_id, text, False, "failed", ttl)
    text = batch_lines.not_run(
        custom_id, "batch_cancelled", "The batch was cancelled before this request finished."
    )
    return BatchLine(record.batch_id, text, False, "", ttl)


def fail(store: JobStore, job_id: str, error: JobError) -> None:
    """Fail a job from outside its run (the watchdog), writing its batch line if it has one."""
    record = store.get(job_id)
    if record is not None:
        store.transition(
            job_id, JobStatus.FAILED, error=error, batch_line=_batch_line(record, store.ttl, error=error)
        )


def run_job(
    job_id: str, store: JobStore, engine: Engine, default_max_tokens: int = 512, *, stream: bool = True
) -> RunOutcome:
    """Run one job. With `stream`, token deltas go to the job's Redis Stream as the engine
    produces them (and a cancel flag stops generation within a step)."""
    record = store.get(job_id)
    if record is None:
        logger.warning("job %s has no record (expired or deleted); dropping its message", job_id)
        return RunOutcome(None, skipped=True)
    if record.status.terminal:
        logger.info("job %s is already %s; skipping redelivered message", job_id, record.status)
        return RunOutcome(record.status, skipped=True)
    started = store.transition(job_id, JobStatus.RUNNING)
    if not started.ok:
        return RunOutcome(JobStatus(started.previous) if started.previous else None, skipped=True)

    requests = gen_requests(job_id, record.request, default_max_tokens)
    attempt = record.job.attempts + 1  # the RUNNING transition just counted this attempt
    targets = [Target(job_id, i, attempt) for i in range(len(requests))]
    sink = StreamSink(store.r, targets, store.ttl)
    outs = engine.generate(requests, sink if stream else None)
    model = record.request.model
    if sink.cancelled(job_id) or (not stream and store.r.exists(keys.cancel(job_id))):
        partial = [o if isinstance(o, GenResult) else GenResult("", "stop", 0, 0) for o in outs]
        result = build_completion(job_id, model, partial)
        store.transition(
            job_id, JobStatus.CANCELLED, result=result, batch_line=_batch_line(record, store.ttl)
        )
        return RunOutcome(JobStatus.CANCELLED)
    failures = [o for o in outs if isinstance(o, Exception)]
    if failures:
        error = JobError(code="engine_error", message=f"{type(failures[0]).__name__}: {failures[0]}")
        line = _batch_line(record, store.ttl, error=error)
        store.transition(job_id, JobStatus.FAILED, error=error, batch_line=line)
        return RunOutcome(JobStatus.FAILED)
    completion = build_completion(job_id, model, [o for o in outs if isinstance(o, GenResult)])
    line = _batch_line(record, store.ttl, completion=completion)
    done = store.transition(job_id, JobStatus.SUCCEEDED, result=completion, batch_line=line)
    if not done.ok:
        logger.info("job %s became %s while running; result discarded", job_id, done.previous)
        return RunOutcome(JobStatus(done.previous), skipped=True)
    return RunOutcome(JobStatus.SUCCEEDED)
