"""Running one job: the logic behind the Celery task, callable without Celery.

Idempotence lives here: a job that is already terminal is skipped, and the final write
goes through the state machine, which refuses to overwrite a finished job. A redelivered
message therefore can never produce a second result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import cast

from core import batch_lines, keys, metrics
from core.job_store import BatchLine, JobRecord, JobStore, Move
from models.hooks import HookFailed, Hooks, Timing
from schemas.grammar import request_grammar
from schemas.jobs import JobError, JobStatus
from schemas.openai import AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, Usage
from schemas.structured import ChoiceLogprobs, TokenLogprob, ToolCall
from schemas.tool_calls import parse_tool_calls
from workers.claim import Window, claim_more, pop_window
from workers.engine import AdapterMissing, Engine, GenParams, GenRequest, GenResult
from workers.options import RunOptions
from workers.streaming import StreamSink, Target

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    status: JobStatus | None
    skipped: bool = False
    completion_tokens: int = 0


def gen_params(request: ChatCompletionRequest, default_max_tokens: int) -> GenParams:
    return GenParams(
        max_tokens=request.token_limit or default_max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=None if request.top_k is None else max(request.top_k, 0),
        stop=tuple(request.stop_list),
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        logit_bias=tuple((int(t), b) for t, b in (request.logit_bias or {}).items()),
        grammar=request_grammar(
            request.response_format, request.tools, request.tool_choice, request.parallel_tool_calls
        ),
        logprobs=request.top_logprobs_n,
    )


def gen_requests(
    request: ChatCompletionRequest, default_max_tokens: int, base_model: str = ""
) -> list[GenRequest]:
    """`n` choices become `n` sibling requests: ms-swift's own `n` breaks its streaming path,
    and siblings share a call anyway. With a `seed`, sibling i samples from its own seed
    derived from it (the same choices for the same seed, but not n copies of one). A `model`
    other than the base one (`base_model`) names a LoRA adapter."""
    messages = request.engine_messages()
    params = gen_params(request, default_max_tokens)
    adapter = request.model if base_model and request.model != base_model else ""
    tools = request.tools_for_engine()
    return [GenRequest(messages, _sibling(params, i), adapter=adapter, tools=tools) for i in range(request.n)]


def _sibling(params: GenParams, i: int) -> GenParams:
    if params.seed is None or i == 0:
        return params
    return replace(params, seed=(params.seed + i * 0x9E3779B97F4A7C15) % 2**63)


def answer(result: GenResult, index: int, calls_tools: bool) -> Choice:
    """One choice: tool calls parsed out of the text when tools were offered (the hermes
    format), logprobs when asked for. A call cut by max_tokens is left as text, with
    finish_reason "length", as OpenAI leaves a cut answer."""
    content: str | None = result.text
    calls: list[ToolCall] = []
    if calls_tools and result.finish_reason == "stop":
        content, calls = parse_tool_calls(result.text)
    logprobs = (
        ChoiceLogprobs(content=[TokenLogprob.model_validate(e) for e in result.logprobs])
        if result.logprobs is not None
        else None
    )
    return Choice(
        index=index,
        message=AssistantMessage(content=content, tool_calls=calls or None),
        finish_reason="tool_calls" if calls else result.finish_reason,
        logprobs=logprobs,
    )


def build_completion(
    job_id: str, model: str, results: list[GenResult], calls_tools: bool = False
) -> ChatCompletion:
    choices = [answer(r, i, calls_tools) for i, r in enumerate(results)]
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


def _start(store: JobStore, job_id: str, opts: RunOptions) -> JobRecord | None:
    record = store.get(job_id)
    if record is None:
        logger.warning("job %s has no record (expired or deleted); dropping its message", job_id)
        return None
    return _start_record(store, record, opts)


def _start_record(store: JobStore, record: JobRecord, opts: RunOptions) -> JobRecord | None:
    """The job as this call's first, running on this worker; None if it is not to run (ended,
    expired, poison, or running on a live worker)."""
    job_id = record.job.id
    if record.status.terminal:
        logger.debug("job %s is already %s; skipping its message", job_id, record.status)
        return None
    now = time.time()
    if record.status is JobStatus.QUEUED and record.expires_at and now > record.expires_at:
        store.transition(
            job_id,
            JobStatus.EXPIRED,
            error=JobError(
                code="expired", message=("The job waited in the queue past its expiry and was not run.")
            ),
        )
        return None
    if record.job.attempts >= opts.max_attempts and not store.recovery.worker_alive(record.worker):
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
    started = store.transition(job_id, JobStatus.RUNNING, worker=opts.worker_id)
    if started.alive:
        logger.info("job %s is being run by a live worker; skipping this delivery", job_id)
    return record if started.ok else None


def fill_call(store: JobStore, job_id: str | None, opts: RunOptions) -> list[JobRecord]:
    """This message's job (`job_id`; None: the first queued job off the lanes) and the
    queued jobs that can share its `generate` call; none if there is nothing to run. Ends
    this process's claim on the lanes in every case."""
    ended = False
    seen: set[str] = set()
    try:
        window = None
        if job_id is not None:
            first = _start(store, job_id, opts)
            seen.add(job_id)
        else:
            first, window = _first_off_lanes(store, opts, seen)
        if first is None:
            return []
        # A job that was already tried (its worker died) runs alone: it may be what killed it.
        # Any other settings share the call: the engine applies each row's own (workers.engines.rows).
        if first.job.attempts:
            return [first]

        def compatible(rec: JobRecord) -> bool:
            return not rec.job.attempts

        ended = True  # claim_more ends the claim, however it returns
        return [first, *claim_more(store, first, opts, first.request.n, compatible, window, seen)]
    finally:
        if not ended:
            store.recovery.end_claim(opts.worker_id)


def _first_off_lanes(
    store: JobStore, opts: RunOptions, seen: set[str]
) -> tuple[JobRecord | None, Window | None]:
    """The call's first job, started, and the rest of the window it came in (one pop for
    both: a drain used to pop the first job alone, read it, then pop the others, three round
    trips for what one does); (None, None) when the lanes are empty."""
    while True:
        window = pop_window(store, opts, opts.max_batch_size * opts.length_window, seen)
        if not any(window):
            return None, None
        for lane, records in enumerate(window):
            for i, record in enumerate(records):
                first = _start_record(store, record, opts)
                if first is not None:  # those before it did not start (ended, expired, ...)
                    window[:lane] = [[] for _ in range(lane)]
                    window[lane] = records[i + 1 :]
                    return first, window


def run_call(job_id: str | None, store: JobStore, engine: Engine, opts: RunOptions) -> list[RunOutcome]:
    """Run the job of this message (None: the first queued one; nothing run, no outcome)
    together with compatible queued jobs, in one `generate`.
    Token deltas go to each job's stream as they are produced; a cancel flag stops a job's
    rows within a step; each job ends on its own (one failing request fails alone)."""
    records = fill_call(store, job_id, opts)
    if not records:
        return [RunOutcome(None, skipped=True)] if job_id is not None else []
    if opts.running is not None:
        opts.running[:] = [rec.job.id for rec in records]
    requests: list[GenRequest] = []
    targets: list[Target] = []
    spans: list[tuple[JobRecord, int, int]] = []
    for rec in records:
        reqs = gen_requests(rec.request, opts.default_max_tokens, opts.base_model)
        attempt = rec.job.attempts + 1  # the RUNNING transition just counted this attempt
        spans.append((rec, len(requests), len(requests) + len(reqs)))
        requests += reqs
        publish = opts.publish_tokens and rec.publish_tokens
        targets += [Target(rec.job.id, i, attempt, publish) for i in range(len(reqs))]
    sink = StreamSink(store.r, targets)
    started = time.time()
    sink.deadlines = {rec.job.id: started + (rec.timeout_s or opts.timeout_s) for rec in records}
    try:
        outs = engine.generate(requests, sink)
        sink.wait_written()  # every token event is written before the jobs' final events
    except Exception as exc:  # the engine broke as a whole: every job of the call fails
        logger.exception("generate failed for %d jobs", len(records))
        outs = [exc] * len(requests)
    finally:
        sink.stop()
    runs = [(rec, outs[a:b]) for rec, a, b in spans]
    return finish_all(store, runs, sink, len(requests), opts.hooks, count=True)


def drain(
    job_id: str, store: JobStore, engine: Engine, opts: RunOptions, budget_s: float
) -> list[RunOutcome]:
    """Run this message's job, then keep running calls of ready jobs back to back for up to
    `budget_s`: the engine never idles waiting for Celery to hand over the next message.
    Lanes are polled in priority order before every call, so an interactive job waits at
    most one call."""
    outcomes = run_call(job_id, store, engine, opts)
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        more = run_call(None, store, engine, opts)
        if not more:
            break
        outcomes += more
    return outcomes


def count_call(store: JobStore, rows: int, calls: int = 1) -> None:
    """Engine calls and the rows they ran (occupancy); in continuous mode generation steps."""
    pipe = store.r.pipeline(transaction=False)
    metrics.observe_rows(pipe, rows, calls, store.ttl)
    pipe.execute()


def finish_all(
    store: JobStore,
    runs: list[tuple[JobRecord, list[GenResult | Exception]]],
    sink: StreamSink,
    rows: int,
    hooks: Hooks | None = None,
    count: bool = False,
) -> list[RunOutcome]:
    """Every job of the call ends on its own terms, in one round trip for the whole call
    (`count`: with the call's metrics, `count_call`'s, in the same round trip). The
    after-hooks run here, the one place a finished job's result is made (static and
    continuous calls alike), so the record, the `done` event and a batch line agree."""
    ids = [rec.job.id for rec, _ in runs]
    flagged = cast(list[str | None], store.r.mget([keys.cancel(j) for j in ids]))
    after: tuple[Hooks, list[Timing]] = (hooks or Hooks(), [])
    extra = {"engine_rows": str(rows)}
    moves = [
        _with_facts(_final_move(store, rec, outs, sink, bool(flag), _fenced(extra, rec), after), sink)
        for (rec, outs), flag in zip(runs, flagged, strict=True)
    ]
    _record_hooks(store, after[1])
    outcomes = []
    also = (lambda pipe: metrics.observe_rows(pipe, rows, 1, store.ttl)) if count else None
    for move, done in zip(moves, store.apply(moves, also), strict=True):
        if done.fenced:
            logger.warning(
                "job %s runs again elsewhere (this worker lost Redis past its heartbeat): "
                "this worker's late result is refused",
                move.job_id,
            )
            outcomes.append(RunOutcome(JobStatus(done.previous), skipped=True))
        elif move.to is JobStatus.SUCCEEDED and not done.ok:
            logger.info("job %s became %s while running; result discarded", move.job_id, done.previous)
            outcomes.append(RunOutcome(JobStatus(done.previous), skipped=True))
        else:
            tokens = move.result.usage.completion_tokens if move.result is not None else 0
            outcomes.append(RunOutcome(move.to, completion_tokens=tokens))
    return outcomes


def _fenced(extra: dict[str, str], record: JobRecord) -> dict[str, str]:
    """The move's facts with its fencing token: the attempt this worker runs (its record was
    read just before the move to running counted it). The transition script refuses the
    move if the job has been started again since, elsewhere."""
    return {**extra, "_attempt": str(record.job.attempts + 1)}


def _record_hooks(store: JobStore, timings: list[Timing]) -> None:
    """The after-hooks' times into the metrics hash, one round trip for the call."""
    if timings:
        pipe = store.r.pipeline(transaction=False)
        for t in timings:
            metrics.observe_hook(pipe, t.stage, t.hook, t.seconds, t.outcome, store.ttl)
        pipe.execute()


def _with_facts(move: Move, sink: StreamSink) -> Move:
    """The metrics only the worker knows, for the transition script (`_` fields are not
    stored): when the first token came, and the tokens a result counts."""
    facts = move.extra if move.extra is not None else {}
    if (first := sink.first_token_at.get(move.job_id)) is not None:
        facts["_first_token_at"] = repr(first)
    if move.result is not None:
        facts["_prompt_tokens"] = str(move.result.usage.prompt_tokens)
        facts["_completion_tokens"] = str(move.result.usage.completion_tokens)
    return replace(move, extra=facts)


def _final_move(
    store: JobStore,
    record: JobRecord,
    outs: list[GenResult | Exception],
    sink: StreamSink,
    cancel_flag: bool,
    extra: dict[str, str],
    after: tuple[Hooks, list[Timing]],
) -> Move:
    job_id, model = record.job.id, record.request.model
    if sink.timed_out(job_id) and not sink.cancelled(job_id):
        error = JobError(
            code="timeout", message=f"Generation exceeded its time limit of {record.timeout_s}s."
        )
        line = _batch_line(record, store.ttl, error=error)
        return Move(job_id, JobStatus.FAILED, error=error, batch_line=line, extra=extra)
    if sink.cancelled(job_id) or cancel_flag:
        partial = [o if isinstance(o, GenResult) else GenResult("", "stop", 0, 0) for o in outs]
        result = build_completion(job_id, model, partial, record.request.calls_tools)
        return Move(
            job_id, JobStatus.CANCELLED, result=result, batch_line=_batch_line(record, store.ttl), extra=extra
        )
    failures = [o for o in outs if isinstance(o, Exception)]
    if failures:
        if isinstance(failures[0], AdapterMissing):
            error = JobError(code="model_not_found", message=str(failures[0]))
        else:
            error = JobError(code="engine_error", message=f"{type(failures[0]).__name__}: {failures[0]}")
        line = _batch_line(record, store.ttl, error=error)
        return Move(job_id, JobStatus.FAILED, error=error, batch_line=line, extra=extra)
    results = [o for o in outs if isinstance(o, GenResult)]
    completion = build_completion(job_id, model, results, record.request.calls_tools)
    return _succeeded(store, record, completion, extra, after)


def _succeeded(
    store: JobStore,
    record: JobRecord,
    completion: ChatCompletion,
    extra: dict[str, str],
    after: tuple[Hooks, list[Timing]],
) -> Move:
    """The result through the after-hooks (models.hooks); one that refuses or raises fails
    this job alone, its batch-mates are not touched."""
    job_id = record.job.id
    hooks, timings = after
    if hooks.has_after:
        try:
            completion = hooks.run_after(record.request, completion, timings)
        except HookFailed as exc:
            logger.warning("job %s: %s", job_id, exc.message)
            error = JobError(code=exc.code, message=exc.message)
            line = _batch_line(record, store.ttl, error=error)
            return Move(job_id, JobStatus.FAILED, error=error, batch_line=line, extra=extra)
    line = _batch_line(record, store.ttl, completion=completion)
    return Move(job_id, JobStatus.SUCCEEDED, result=completion, batch_line=line, extra=extra)


def run_job(
    job_id: str, store: JobStore, engine: Engine, default_max_tokens: int = 512, *, stream: bool = True
) -> RunOutcome:
    """One job alone (no micro-batching); `stream=False` publishes no token events."""
    opts = RunOptions(default_max_tokens=default_max_tokens, publish_tokens=stream)
    return run_call(job_id, store, engine, opts)[0]
