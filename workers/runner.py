"""Running one job: the logic behind the Celery task, callable without Celery.

Idempotence lives here: a job that is already terminal is skipped, and the final write
goes through the state machine, which refuses to overwrite a finished job. A redelivered
message therefore can never produce a second result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import cast

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


@dataclass(frozen=True)
class RunOptions:
    default_max_tokens: int = 512
    #: rows (requests, counting `n`) one `generate` call may take
    max_batch_size: int = 1
    #: seconds a running job's lease lasts without renewal (the heartbeat renews it)
    lease_s: float = 30.0
    #: lanes to pull more jobs from, in priority order (their `ready` lists)
    lanes: tuple[str, ...] = ()
    #: how long to wait for more jobs when the batch is not full (a shallow queue)
    collect_s: float = 0.0
    #: jobs from this lane do not publish token events (nobody watches batch lines)
    quiet_lane: str = ""
    #: False: no job of the call publishes token events
    publish_tokens: bool = True
    #: filled with the ids of the jobs being run, for the caller's lease renewal
    running: list[str] | None = None
    #: a job whose worker died this many times is failed instead of run again
    max_attempts: int = 3
    #: generation time limit when the record has none
    timeout_s: float = 600.0


def _start(store: JobStore, job_id: str, opts: RunOptions) -> JobRecord | None:
    record = store.get(job_id)
    if record is None:
        logger.warning("job %s has no record (expired or deleted); dropping its message", job_id)
        return None
    if record.status.terminal:
        logger.info("job %s is already %s; skipping its message", job_id, record.status)
        return None
    now = time.time()
    if record.status is JobStatus.QUEUED and record.job.expires_at and now > record.job.expires_at:
        store.transition(
            job_id,
            JobStatus.EXPIRED,
            error=JobError(
                code="expired", message=("The job waited in the queue past its expiry and was not run.")
            ),
        )
        return None
    if record.job.attempts >= opts.max_attempts and record.lease_until < now:
        # every earlier attempt died with its worker process: a poison request
        error = JobError(
            code="worker_crashed",
            message=(
                f"The worker process died {record.job.attempts} times while running this request; "
                "it is not retried again."
            ),
        )
        store.transition(
            job_id, JobStatus.FAILED, error=error, batch_line=_batch_line(record, store.ttl, error=error)
        )
        return None
    started = store.transition(job_id, JobStatus.RUNNING, lease_s=opts.lease_s)
    if started.leased:
        logger.info("job %s is being run by a live worker; skipping this delivery", job_id)
    return record if started.ok else None


def _claim_more(store: JobStore, first: JobRecord, opts: RunOptions, rows: int) -> list[JobRecord]:
    """Pull queued jobs that can share `first`'s generate call, up to `max_batch_size` rows.

    Their own Celery messages stay in the queue: when they arrive later, the job is already
    finished and the message is skipped, so each job still has its own task in Flower."""
    params = gen_params(first.request, opts.default_max_tokens)
    claimed: list[JobRecord] = []
    if params.seed is not None:
        return claimed  # a seeded request runs alone: its text must not depend on its batch-mates
    seen = {first.job.id}
    deadline = time.monotonic() + opts.collect_s
    for attempt in range(2):
        for lane in opts.lanes:
            if rows >= opts.max_batch_size:
                break
            ids = cast(list[str] | None, store.r.lpop(keys.ready(lane), opts.max_batch_size - rows)) or []
            putback: list[str] = []
            for job_id in ids:
                if job_id in seen:
                    continue
                seen.add(job_id)
                rec = store.get(job_id)
                if rec is None or rec.status is not JobStatus.QUEUED:
                    continue
                if rec.job.expires_at and time.time() > rec.job.expires_at:
                    continue  # its own message will end it `expired`
                fits = rows + rec.request.n <= opts.max_batch_size
                if not fits or gen_params(rec.request, opts.default_max_tokens) != params:
                    putback.append(job_id)  # another batch will take it
                    continue
                if store.transition(job_id, JobStatus.RUNNING, lease_s=opts.lease_s).ok:
                    claimed.append(rec)
                    rows += rec.request.n
            if putback:
                store.r.lpush(keys.ready(lane), *reversed(putback))
        wait = deadline - time.monotonic()
        if rows >= opts.max_batch_size or wait <= 0 or attempt:
            break
        time.sleep(wait)  # a shallow queue: give more jobs a moment to arrive, once
    return claimed


def run_batch(job_id: str, store: JobStore, engine: Engine, opts: RunOptions) -> list[RunOutcome]:
    """Run the job of this message together with compatible queued jobs, in one `generate`.
    Token deltas go to each job's stream as they are produced; a cancel flag stops a job's
    rows within a step; each job ends on its own (one failing request fails alone)."""
    first = _start(store, job_id, opts)
    if first is None:
        return [RunOutcome(None, skipped=True)]
    # A job that was already tried (its worker died) runs alone: it may be what killed it.
    records = [first] if first.job.attempts else [first, *_claim_more(store, first, opts, first.request.n)]
    if opts.running is not None:
        opts.running[:] = [rec.job.id for rec in records]
    requests: list[GenRequest] = []
    targets: list[Target] = []
    spans: list[tuple[JobRecord, int, int]] = []
    for rec in records:
        reqs = gen_requests(rec.job.id, rec.request, opts.default_max_tokens)
        attempt = rec.job.attempts + 1  # the RUNNING transition just counted this attempt
        spans.append((rec, len(requests), len(requests) + len(reqs)))
        requests += reqs
        publish = opts.publish_tokens and rec.queue != opts.quiet_lane
        targets += [Target(rec.job.id, i, attempt, publish) for i in range(len(reqs))]
    sink = StreamSink(store.r, targets, store.ttl)
    started = time.time()
    sink.deadlines = {rec.job.id: started + (rec.timeout_s or opts.timeout_s) for rec in records}
    try:
        outs = engine.generate(requests, sink)
    except Exception as exc:  # the engine broke as a whole: every job of the call fails
        logger.exception("generate failed for %d jobs", len(records))
        outs = [exc] * len(requests)
    _count_batch(store, len(requests))
    extra = {"batch_rows": str(len(requests))}
    return [_finish(store, rec, outs[a:b], sink, extra) for rec, a, b in spans]


def drain(
    job_id: str, store: JobStore, engine: Engine, opts: RunOptions, budget_s: float
) -> list[RunOutcome]:
    """Run this message's job, then keep running batches of ready jobs back to back for up to
    `budget_s`: the engine never idles waiting for Celery to hand over the next message.
    Lanes are polled in priority order before every batch, so an interactive job waits at
    most one batch cycle."""
    outcomes = run_batch(job_id, store, engine, opts)
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        nxt = _next_ready(store, opts)
        if nxt is None:
            break
        outcomes += run_batch(nxt, store, engine, opts)
    return outcomes


def _next_ready(store: JobStore, opts: RunOptions) -> str | None:
    for lane in opts.lanes:
        while job_id := cast(str | None, store.r.lpop(keys.ready(lane))):
            if store.r.hget(keys.job(job_id), "status") == JobStatus.QUEUED.value:
                return job_id
    return None


def _count_batch(store: JobStore, rows: int) -> None:
    pipe = store.r.pipeline(transaction=False)
    pipe.hincrby(keys.stats(), "batches", 1)
    pipe.hincrby(keys.stats(), "batch_rows", rows)
    pipe.expire(keys.stats(), store.ttl)
    pipe.execute()


def _finish(
    store: JobStore,
    record: JobRecord,
    outs: list[GenResult | Exception],
    sink: StreamSink,
    extra: dict[str, str],
) -> RunOutcome:
    job_id, model = record.job.id, record.request.model
    if sink.timed_out(job_id) and not sink.cancelled(job_id):
        error = JobError(
            code="timeout", message=f"Generation exceeded its time limit of {record.timeout_s}s."
        )
        line = _batch_line(record, store.ttl, error=error)
        store.transition(job_id, JobStatus.FAILED, error=error, batch_line=line, extra=extra)
        return RunOutcome(JobStatus.FAILED)
    if sink.cancelled(job_id) or store.r.exists(keys.cancel(job_id)):
        partial = [o if isinstance(o, GenResult) else GenResult("", "stop", 0, 0) for o in outs]
        result = build_completion(job_id, model, partial)
        line = _batch_line(record, store.ttl)
        store.transition(job_id, JobStatus.CANCELLED, result=result, batch_line=line, extra=extra)
        return RunOutcome(JobStatus.CANCELLED)
    failures = [o for o in outs if isinstance(o, Exception)]
    if failures:
        error = JobError(code="engine_error", message=f"{type(failures[0]).__name__}: {failures[0]}")
        line = _batch_line(record, store.ttl, error=error)
        store.transition(job_id, JobStatus.FAILED, error=error, batch_line=line, extra=extra)
        return RunOutcome(JobStatus.FAILED)
    completion = build_completion(job_id, model, [o for o in outs if isinstance(o, GenResult)])
    line = _batch_line(record, store.ttl, completion=completion)
    done = store.transition(job_id, JobStatus.SUCCEEDED, result=completion, batch_line=line, extra=extra)
    if not done.ok:
        logger.info("job %s became %s while running; result discarded", job_id, done.previous)
        return RunOutcome(JobStatus(done.previous), skipped=True)
    return RunOutcome(JobStatus.SUCCEEDED)


def run_job(
    job_id: str, store: JobStore, engine: Engine, default_max_tokens: int = 512, *, stream: bool = True
) -> RunOutcome:
    """One job alone (no micro-batching); `stream=False` publishes no token events."""
    opts = RunOptions(default_max_tokens=default_max_tokens, publish_tokens=stream)
    return run_batch(job_id, store, engine, opts)[0]
