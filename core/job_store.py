"""Job records in Redis and the state machine that guards them.

Why Lua: a transition must read the current status and write the new one atomically,
so that a redelivered task can never overwrite a finished result (idempotent result
write) and a cancel racing a finish has exactly one winner. The same script appends the
status event to the job's stream, so the stream's order always matches the record's.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio as aredis

from core import audit, keys, lanes, metrics, redis_conn, scripts
from core.recovery import Recovery
from schemas.jobs import TRANSITIONS, Job, JobError, JobStatus
from schemas.openai import ChatCompletion, ChatCompletionRequest

#: Cap on a job's event stream; a generation longer than this in flushes is trimmed
#: from the front (clients that fell that far behind get the final result instead).
EVENTS_MAXLEN = 10_000


def new_job_id() -> str:
    return f"job_{uuid.uuid4().hex}"


def _sources(to: JobStatus) -> str:
    return ",".join(s.value for s, targets in TRANSITIONS.items() if to in targets)


@dataclass(frozen=True)
class TransitionResult:
    """`ok` false means the move was refused; `previous` says from what (or "" if missing)."""

    ok: bool
    previous: str
    missing: bool = False
    #: refused: the job runs on a worker whose heartbeat stands
    alive: bool = False
    #: refused: the job runs again elsewhere (a later attempt than the move's `_attempt`)
    fenced: bool = False
    #: the job ended with this move: its facts for the audit line
    finished: audit.Finished | None = None


@dataclass(frozen=True)
class JobRecord:
    """A decoded record: the public job plus what only the worker needs."""

    job: Job
    request: ChatCompletionRequest
    lane: str
    batch_id: str = ""
    custom_id: str = ""
    #: the worker that runs it, or ran it last ("" before it first ran)
    worker: str = ""
    #: generation time limit, seconds
    timeout_s: float | None = None
    #: the API key that created it ("" without keys)
    owner: str = ""
    #: counted by the API at submission; batches group jobs of similar length by it
    prompt_tokens: int = 0
    #: False: nobody follows this job's tokens (a non-stream chat request, a batch line),
    #: so the worker writes none; its stream still gets its status and final events
    publish_tokens: bool = True
    #: when a still-queued job expires, to the fraction of a second (`job.expires_at` is
    #: the public view's whole seconds)
    expires_at: float | None = None

    @property
    def status(self) -> JobStatus:
        return self.job.status


@dataclass(frozen=True)
class BatchLine:
    """What a batch job writes when it ends: one line of the output or error file."""

    batch_id: str
    line: str
    to_output: bool
    counter: str  # "completed", "failed" or "" (cancelled/expired lines count in neither)
    ttl: int
    input_tokens: int = 0
    output_tokens: int = 0

    def fields(self) -> dict[str, str]:
        return {
            "_line": self.line,
            "_list": "out" if self.to_output else "err",
            "_count": self.counter,
            "_ttl": str(self.ttl),
            "_in": str(self.input_tokens),
            "_out": str(self.output_tokens),
        }

    def keys(self) -> list[str]:
        return [keys.batch_output(self.batch_id), keys.batch_errors(self.batch_id), keys.batch(self.batch_id)]


#: Share of job creations that also trim their listing index (its ids past the TTL).
_TRIM_SHARE = 1 / 32

#: The record field that marks a job whose tokens nobody reads (JobRecord.publish_tokens).
NO_TOKENS = ("tokens", "0")


def encode_new(
    job_id: str, request: ChatCompletionRequest, lane: str, now: float, prompt_tokens: int
) -> dict[str, str]:
    return {
        "id": job_id,
        "status": JobStatus.QUEUED.value,
        "model": request.model,
        "created_at": repr(now),
        "attempts": "0",
        "metadata": json.dumps(request.metadata or {}),
        "request": request.model_dump_json(exclude_none=True),
        "queue": lane,  # the lane; stored under its first name, which records keep
        "prompt_tokens": str(prompt_tokens),
    }


def _whole_seconds(stored: str | None) -> int | None:
    """A record's time (a float, to the microsecond, which the transition scripts, metrics
    and the audit log use) as the public job shows it: whole Unix seconds, floored."""
    return math.floor(float(stored)) if stored else None


def decode(raw: dict[str, str]) -> JobRecord | None:
    if not raw or "status" not in raw:
        return None
    job = Job(
        id=raw["id"],
        status=JobStatus(raw["status"]),
        model=raw.get("model", ""),
        created_at=math.floor(float(raw["created_at"])),
        expires_at=_whole_seconds(raw.get("expires_at")),
        started_at=_whole_seconds(raw.get("started_at")),
        finished_at=_whole_seconds(raw.get("finished_at")),
        attempts=int(raw.get("attempts", "0")),
        # "batch_rows": the field's name in records written before 0.2
        engine_rows=int(rows) if (rows := raw.get("engine_rows") or raw.get("batch_rows")) else None,
        metadata=json.loads(raw.get("metadata") or "{}"),
        lane=lanes.parts(raw["queue"])[0] if raw.get("queue") else None,  # the queue, not the model
        batch_id=raw.get("batch_id") or None,
        result=ChatCompletion.model_validate_json(raw["result"]) if raw.get("result") else None,
        error=JobError.model_validate_json(raw["error"]) if raw.get("error") else None,
    )
    request = ChatCompletionRequest.model_validate_json(raw["request"])
    return JobRecord(
        job=job,
        request=request,
        lane=raw.get("queue", ""),
        batch_id=raw.get("batch_id", ""),
        custom_id=raw.get("custom_id", ""),
        worker=raw.get("worker", ""),
        timeout_s=float(raw["timeout_s"]) if raw.get("timeout_s") else None,
        owner=raw.get("owner", ""),
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        publish_tokens=raw.get(NO_TOKENS[0]) != NO_TOKENS[1],
        expires_at=float(raw["expires_at"]) if raw.get("expires_at") else None,
    )


def _transition_args(to: JobStatus, now: float, ttl: int, fields: dict[str, str]) -> list[str]:
    args = [to.value, repr(now), str(ttl), _sources(to), "1" if to.terminal else "0"]
    for k, v in fields.items():
        args += [k, v]
    return args


def _queue_create(pipe: Any, job_id: str, fields: dict[str, str], ttl: int) -> None:
    """Record and first status event in one MULTI; works on sync and async pipelines alike."""
    pipe.hset(keys.job(job_id), mapping=fields)
    pipe.expire(keys.job(job_id), ttl)
    pipe.xadd(
        keys.job_events(job_id),
        {"type": "status", "status": "queued", "attempt": "0"},
        maxlen=EVENTS_MAXLEN,
        approximate=True,
    )
    pipe.expire(keys.job_events(job_id), ttl)
    lane, now = fields["queue"], float(fields["created_at"])
    metrics.count_queued(pipe, lane, ttl)
    if not fields.get("batch_id"):  # batch lines are listed through their batch
        index = keys.owner_jobs(fields["owner"]) if fields.get("owner") else keys.JOB_INDEX
        pipe.zadd(index, {job_id: now})
        pipe.expire(index, ttl)
        if random.random() < _TRIM_SHARE:  # every so often: ids older than their records go
            pipe.zremrangebyscore(index, "-inf", now - ttl)


def _finish_fields(result: ChatCompletion | None, error: JobError | None) -> dict[str, str]:
    fields: dict[str, str] = {}
    if result is not None:
        fields["result"] = result.model_dump_json()
    if error is not None:
        fields["error"] = error.model_dump_json()
    return fields


def _parse(reply: list[Any], move: Move | None = None, now: float = 0.0) -> TransitionResult:
    status, prev, *facts = (x.decode() if isinstance(x, bytes) else x for x in reply)
    finished = None
    if facts and move is not None:
        finished = audit.Finished.from_reply(move.job_id, move.to.value, now, facts)
    return TransitionResult(
        ok=status == "ok",
        previous=prev,
        missing=status == "missing",
        alive=status == "alive",
        fenced=status == "fenced",
        finished=finished,
    )


def _request_messages(raw: str | None) -> Any:
    """A record's `request` field's messages, for an audit line with content."""
    return json.loads(raw).get("messages") if raw else None


def _audit(log: audit.AuditLog | None, move: Move, done: TransitionResult, request: Any = None) -> None:
    """The audit line of a move that ended its job (content: the request's messages, given)."""
    if log is None or not log.enabled or done.finished is None:
        return
    content = None
    if log.content:
        content = {
            "messages": request,
            "output": [c.message.content for c in move.result.choices] if move.result else None,
        }
    log.write(audit.line(done.finished, move.result, move.error.code if move.error else "", content))


@dataclass(frozen=True)
class Move:
    """One state-machine transition, for `JobStore.apply` (many in one round trip)."""

    job_id: str
    to: JobStatus
    result: ChatCompletion | None = None
    error: JobError | None = None
    batch_line: BatchLine | None = None
    #: the worker that runs it (a move to RUNNING)
    worker: str = ""
    extra: dict[str, str] | None = None


def _move_call(m: Move, now: float, ttl: int) -> tuple[list[str], list[str]]:
    """The transition script's keys and args for one move (sync and async stores alike)."""
    fields = {
        **_finish_fields(m.result, m.error),
        **(m.batch_line.fields() if m.batch_line else {}),
        **(m.extra or {}),
    }
    if m.to is JobStatus.RUNNING and not m.worker:
        raise ValueError("a move to running names the worker that runs the job")
    if m.worker:
        fields["_worker"] = m.worker
    args = [*_transition_args(m.to, now, ttl, fields), str(EVENTS_MAXLEN)]
    job_keys = [
        keys.job(m.job_id),
        keys.job_events(m.job_id),
        keys.PROCESSING_WORKERS,
        *(m.batch_line.keys() if m.batch_line else []),
    ]
    return job_keys, args


def _moves_call(moves: Sequence[Move], now: float, ttl: int) -> tuple[list[str], list[str]]:
    """One call of the transition script for all `moves`: their counts of keys and args, then
    each move's keys and args in turn (core/lua/transition.lua's header)."""
    calls = [_move_call(m, now, ttl) for m in moves]
    head = [str(len(calls))]
    for call_keys, args in calls:
        head += [str(len(call_keys)), str(len(args))]
    return [k for call_keys, _ in calls for k in call_keys], head + [a for _, args in calls for a in args]


class JobStore:
    """Blocking store, used by the worker child."""

    def __init__(self, client: redis.Redis, ttl: int, audit_log: audit.AuditLog | None = None) -> None:
        self.r = client
        self.ttl = ttl
        self.audit_log = audit_log
        self._transition = client.register_script(scripts.transition())
        #: the processing lists: claiming ready jobs, and putting back those of dead workers
        self.recovery = Recovery(client, ttl)

    def create(self, request: ChatCompletionRequest, lane: str, prompt_tokens: int) -> str:
        job_id = new_job_id()
        fields = encode_new(job_id, request, lane, time.time(), prompt_tokens)
        pipe = self.r.pipeline(transaction=True)
        _queue_create(pipe, job_id, fields, self.ttl)
        pipe.execute()
        return job_id

    def get(self, job_id: str) -> JobRecord | None:
        return decode(cast(dict[str, str], self.r.hgetall(keys.job(job_id))))

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        return [decode(cast(dict[str, str], raw)) for raw in pipe.execute()]

    def fields_of(self, job_ids: list[str], names: Sequence[str]) -> list[dict[str, str]]:
        """Some fields of several records in one round trip (the worker parent's checks of
        job messages: the status and what Flower is told, in one read); a missing record or
        field is absent from its dict."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), list(names))
        rows = cast(list[list[str | None]], pipe.execute())
        return [{k: v for k, v in zip(names, row, strict=True) if v} for row in rows]

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        result: ChatCompletion | None = None,
        error: JobError | None = None,
        batch_line: BatchLine | None = None,
        worker: str = "",
        extra: dict[str, str] | None = None,
    ) -> TransitionResult:
        return self.apply([Move(job_id, to, result, error, batch_line, worker, extra)])[0]

    def apply(self, moves: list[Move], also: Callable[[Any], None] | None = None) -> list[TransitionResult]:
        """Each move is atomic; an engine call's moves are one script call (their metrics
        summed), in one round trip with whatever `also` adds to its pipeline (the call's own
        metrics)."""
        if not moves:
            return []
        now = time.time()
        (replies,) = scripts.run_pipelined(
            self.r, self._transition, [_moves_call(moves, now, self.ttl)], also
        )
        done = [_parse(reply, m, now) for reply, m in zip(replies, moves, strict=True)]
        for m, d in zip(moves, done, strict=True):
            if d.finished is not None and self.audit_log is not None:
                _audit(self.audit_log, m, d, self._messages(m.job_id) if self.audit_log.content else None)
        return done

    def _messages(self, job_id: str) -> Any:
        return _request_messages(cast(str | None, self.r.hget(keys.job(job_id), "request")))


class AsyncJobStore:
    """Non-blocking twin for the API; shares the encoding and the script above."""

    def __init__(
        self,
        client: aredis.Redis,
        ttl: int,
        audit_log: audit.AuditLog | None = None,
        wait_replicas: tuple[int, int] = (0, 0),
    ) -> None:
        self.r = client
        self.ttl = ttl
        self.audit_log = audit_log
        #: (replicas, timeout ms) that must hold a new record before it is answered; (0, 0): off
        self.wait_replicas = wait_replicas
        self._transition = client.register_script(scripts.transition())

    async def create(
        self,
        request: ChatCompletionRequest,
        lane: str,
        prompt_tokens: int,
        extra: dict[str, str] | None = None,
        message: Callable[[str], str] | None = None,
    ) -> Job:
        """The record, its first event and (given `message`, which builds the broker message
        for a job id) the task message and the ready-list entry, in one MULTI: a job is never
        recorded without being enqueued, nor enqueued without a record."""
        job_id = new_job_id()
        fields = {**encode_new(job_id, request, lane, time.time(), prompt_tokens), **(extra or {})}
        async with self.r.pipeline(transaction=True) as pipe:
            _queue_create(pipe, job_id, fields, self.ttl)
            if message is not None:
                pipe.lpush(lane, message(job_id))
                pipe.rpush(keys.ready(lane), job_id)
                pipe.expire(keys.ready(lane), self.ttl)
            await pipe.execute()
        await self.replicated(keys.job(job_id))
        record = decode(fields)
        assert record is not None
        return record.job

    async def replicated(self, key: str) -> None:
        """With INFERQ_REDIS_WAIT_REPLICAS: `key`, and what was written before, is on that many
        replicas, or NotReplicated (a 503): a failover cannot lose what is answered after."""
        await redis_conn.wait_replicas(self.r, *self.wait_replicas, written=key)

    async def get(self, job_id: str) -> JobRecord | None:
        return decode(cast(dict[str, str], await self.r.hgetall(keys.job(job_id))))

    async def reserve_active(self, owner: str, units: int, limit: int) -> int | None:
        """Counts a key's unfinished work (each job's end releases it, in the transition
        script). Returns the count before, or None (nothing reserved) if over `limit`."""
        if not owner:
            return 0
        key = keys.active(owner)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.incrby(key, units)
            pipe.expire(key, self.ttl)
            total, _ = await pipe.execute()
        if limit and total > limit:
            await self.r.decrby(key, units)
            return None
        return int(total) - units

    async def release_active(self, owner: str, units: int) -> None:
        if owner and units:
            await self.r.decrby(keys.active(owner), units)

    async def request_cancel(self, job_id: str) -> None:
        """Raise the flag the worker's stopping criterion polls."""
        await self.r.set(keys.cancel(job_id), "1", ex=self.ttl)

    async def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        error: JobError | None = None,
        batch_line: BatchLine | None = None,
    ) -> TransitionResult:
        move, now = Move(job_id, to, error=error, batch_line=batch_line), time.time()
        job_keys, args = _moves_call([move], now, self.ttl)
        (reply,) = await self._transition(keys=job_keys, args=args)
        done = _parse(reply, move, now)
        if done.finished is not None and self.audit_log is not None:
            messages = None
            if self.audit_log.content:
                messages = _request_messages(cast(str | None, await self.r.hget(keys.job(job_id), "request")))
            _audit(self.audit_log, move, done, messages)
        return done

    async def create_batch_jobs(
        self, jobs: list[tuple[str, ChatCompletionRequest, int, dict[str, str]]]
    ) -> None:
        """Records for batch lines under deterministic ids, each on the lane its fields name
        (`queue`: its model's batch lane); ids that already exist (a dispatcher that
        restarted mid-chunk) are kept as they are."""
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id, *_ in jobs:
                pipe.exists(keys.job(job_id))
            present = await pipe.execute()
        now = time.time()
        async with self.r.pipeline(transaction=True) as pipe:
            for (job_id, request, prompt_tokens, extra), exists in zip(jobs, present, strict=True):
                if not exists:
                    fields = {**encode_new(job_id, request, extra["queue"], now, prompt_tokens), **extra}
                    _queue_create(pipe, job_id, fields, self.ttl)
            await pipe.execute()
