"""Job records in Redis and the state machine that guards them.

Why Lua: a transition must read the current status and write the new one atomically,
so that a redelivered task can never overwrite a finished result (idempotent result
write) and a cancel racing a finish has exactly one winner. The same script appends the
status event to the job's stream, so the stream's order always matches the record's.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
import redis.asyncio as aredis

from core import audit, keys, metrics
from schemas.jobs import TRANSITIONS, Job, JobError, JobStatus
from schemas.openai import ChatCompletion, ChatCompletionRequest

#: Cap on a job's event stream; a generation longer than this in flushes is trimmed
#: from the front (clients that fell that far behind get the final result instead).
EVENTS_MAXLEN = 10_000

#: Take up to ARGV[1] ids off the first non-empty ready list (lanes in priority order) into
#: the worker's processing list, in one step: an id is never only in the memory of a process
#: that can die (a popped id may be the only way to a queued job whose message a dead
#: worker parent held until the visibility timeout).
#: KEYS: processing, PROCESSING_WORKERS, then the ready list of each lane; ARGV: count, ttl, worker.
_POP_LUA = """
for i = 3, #KEYS do
  local ids = redis.call('LPOP', KEYS[i], tonumber(ARGV[1]))
  if ids then
    for j = 1, #ids, 1000 do  -- unpack is bounded by Lua's stack
      redis.call('RPUSH', KEYS[1], unpack(ids, j, math.min(j + 999, #ids)))
    end
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    redis.call('SADD', KEYS[2], ARGV[3])
    redis.call('EXPIRE', KEYS[2], ARGV[2])
    return ids
  end
end
return {}
"""

#: A worker's list after it filled a batch: what it runs stays; its queued ids (looked at
#: and left, or never looked at because something failed) go back to the head of their
#: lanes, in order; the rest (finished, taken by another worker) leave it.
#: KEYS: processing; ARGV: worker, ttl.
_TIDY_LUA = """
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #ids, 1, -1 do
  local f = redis.call('HMGET', '{job}' .. ids[i], 'status', 'worker', 'queue')
  if f[1] ~= 'running' or f[2] ~= ARGV[1] then
    redis.call('LREM', KEYS[1], 0, ids[i])
    if f[1] == 'queued' and f[3] then
      redis.call('LPUSH', '{ready}' .. f[3], ids[i])
      redis.call('EXPIRE', '{ready}' .. f[3], ARGV[2])
    end
  end
end
return #ids
"""

#: A worker whose heartbeat lapsed (or, ARGV[3] = '1', a live one settling its own list
#: between tasks): its queued ids go back to the head of their lanes in order; the jobs it
#: was running stop being its (`worker` cleared, so a new message may run them) and go to
#: the durable RESEND list, from which they are sent again and removed only once sent.
#: A settled job's attempt is given back: its worker did not die. Nothing if the heartbeat
#: is back. One call, so two reapers never both take a list.
#: KEYS: processing, PROCESSING_WORKERS, heartbeat, RESEND; ARGV: worker, ttl, own.
_REAP_LUA = """
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local moved = 0
for i = #ids, 1, -1 do
  local job = '{job}' .. ids[i]
  local f = redis.call('HMGET', job, 'status', 'queue', 'worker')
  if f[1] == 'queued' and f[2] then
    redis.call('LPUSH', '{ready}' .. f[2], ids[i])
    redis.call('EXPIRE', '{ready}' .. f[2], ARGV[2])
  elseif f[1] == 'running' and f[3] == ARGV[1] then
    redis.call('HSET', job, 'worker', '')
    if ARGV[3] == '1' then redis.call('HINCRBY', job, 'attempts', -1) end
    redis.call('RPUSH', KEYS[4], ids[i] .. '|' .. (f[2] or ''))
    redis.call('EXPIRE', KEYS[4], ARGV[2])
    moved = moved + 1
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return moved
"""

_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', ''} end
local ok = false
for s in string.gmatch(ARGV[4], '[^,]+') do if s == cur then ok = true end end
if not ok then return {'conflict', cur} end
local to = ARGV[1]
local id = string.sub(KEYS[1], string.len('{job}') + 1)
local worker = redis.call('HGET', KEYS[1], 'worker')
if to == 'running' and cur == 'running' and worker and redis.call('EXISTS', '{worker}' .. worker) == 1 then
  -- its worker is alive (its heartbeat stands): it is being run; never run it twice
  return {'alive', cur}
end
local maxlen = ARGV[#ARGV]
local now = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'status', to)
local lane = redis.call('HGET', KEYS[1], 'queue') or ''
local created = tonumber(redis.call('HGET', KEYS[1], 'created_at') or ARGV[2])
if cur == 'queued' then redis.call('HINCRBY', '{metrics}', 'depth|' .. lane, -1) end
local payload = {}
for i = 6, #ARGV - 1, 2 do
  if string.sub(ARGV[i], 1, 1) ~= '_' then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  payload[ARGV[i]] = ARGV[i + 1]
end
if worker and worker ~= payload['_worker'] then
  -- it ended, or a new worker runs it: it is no longer the old one's
  redis.call('LREM', '{processing}' .. worker, 0, id)
end
local ended = nil  -- set when the move ends the job
if to == 'running' then
  local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  if attempt == 1 then observe('queue_wait', lane, now - created) end
  redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
  local mine = '{processing}' .. (payload['_worker'] or '')
  redis.call('HSET', KEYS[1], 'worker', payload['_worker'] or '')
  if not redis.call('LPOS', mine, id) then redis.call('RPUSH', mine, id) end
  redis.call('EXPIRE', mine, ARGV[3])
  redis.call('SADD', KEYS[3], payload['_worker'])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  if attempt > 1 then
    -- a redelivery: subscribers drop the partial text of the attempt that died
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', 'reset', 'attempt', tostring(attempt))
  end
elseif ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
  -- the finished job's facts, read once: the active counter, the metrics, the audit line
  ended = redis.call('HMGET', KEYS[1], 'started_at', 'owner', 'model', 'batch_id')
  local started, owner = ended[1], ended[2]
  if owner and owner ~= '' then redis.call('DECR', '{active}' .. owner) end
  redis.call('HINCRBY', '{metrics}', 'finished|' .. lane .. '|' .. to, 1)
  redis.call('HINCRBY', '{metrics}', 'model_jobs|' .. (ended[3] or ''), 1)
  if started and cur == 'running' then observe('run', lane, now - tonumber(started)) end
  if payload['_first_token_at'] then observe('ttft', lane, tonumber(payload['_first_token_at']) - created) end
  if payload['_prompt_tokens'] then
    redis.call('HINCRBY', '{metrics}', 'prompt_tokens|' .. lane, payload['_prompt_tokens'])
    redis.call('HINCRBY', '{metrics}', 'generated_tokens|' .. lane, payload['_completion_tokens'] or 0)
  end
end
redis.call('EXPIRE', '{metrics}', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local attempts = redis.call('HGET', KEYS[1], 'attempts') or '0'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', 'status', 'status', to, 'attempt', attempts)
if to == 'succeeded' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', 'done', 'result', payload['result'] or '')
elseif to == 'failed' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', 'error', 'error', payload['error'] or '')
  local failure = {job_id = id, at = now, lane = lane, error = payload['error'] or ''}
  redis.call('LPUSH', '{failures}', cjson.encode(failure))
  redis.call('LTRIM', '{failures}', 0, {failures_maxlen} - 1)
  redis.call('EXPIRE', '{failures}', ARGV[3])
elseif to == 'cancelled' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', 'cancelled',
             'result', payload['result'] or '')
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
if payload['_line'] and #KEYS >= 6 then
  -- a batch line: its output/error line and the batch counters move with the job, atomically
  local list = KEYS[5]
  if payload['_list'] == 'out' then list = KEYS[4] end
  redis.call('RPUSH', list, payload['_line'])
  redis.call('EXPIRE', list, payload['_ttl'])
  redis.call('HINCRBY', KEYS[6], 'done_lines', 1)
  if payload['_count'] ~= '' then redis.call('HINCRBY', KEYS[6], payload['_count'], 1) end
  redis.call('HINCRBY', KEYS[6], 'input_tokens', payload['_in'] or 0)
  redis.call('HINCRBY', KEYS[6], 'output_tokens', payload['_out'] or 0)
end
if ended then
  -- what the audit line of a finished job needs (core.audit), read in the same step
  return {'ok', cur, lane, tostring(created), ended[1] or '', attempts, ended[2] or '', ended[3] or '',
          ended[4] or ''}
end
return {'ok', cur}
"""


def _with_prefixes(script: str) -> str:
    """The scripts' key names come from core.keys, like every other key."""
    for name, prefix in (
        ("{job}", keys.JOB_PREFIX),
        ("{ready}", keys.READY_PREFIX),
        ("{worker}", keys.WORKER_PREFIX),
        ("{processing}", keys.PROCESSING_PREFIX),
        ("{active}", keys.ACTIVE_PREFIX),
        ("{metrics}", keys.METRICS),
        ("{failures}", keys.FAILURES),
        ("{failures_maxlen}", str(keys.FAILURES_MAXLEN)),
    ):
        script = script.replace(name, prefix)
    return script


_TRANSITION_LUA = metrics.LUA_OBSERVE + _TRANSITION_LUA
_TRANSITION_LUA, _POP_LUA, _TIDY_LUA, _REAP_LUA = map(
    _with_prefixes, (_TRANSITION_LUA, _POP_LUA, _TIDY_LUA, _REAP_LUA)
)


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
    #: the job ended with this move: its facts for the audit line
    finished: audit.Finished | None = None


@dataclass(frozen=True)
class JobRecord:
    """A decoded record: the public job plus what only the worker needs."""

    job: Job
    request: ChatCompletionRequest
    queue: str
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
    job_id: str, request: ChatCompletionRequest, queue: str, now: float, prompt_tokens: int
) -> dict[str, str]:
    return {
        "id": job_id,
        "status": JobStatus.QUEUED.value,
        "model": request.model,
        "created_at": repr(now),
        "attempts": "0",
        "metadata": json.dumps(request.metadata or {}),
        "request": request.model_dump_json(exclude_none=True),
        "queue": queue,
        "prompt_tokens": str(prompt_tokens),
    }


def decode(raw: dict[str, str]) -> JobRecord | None:
    if not raw or "status" not in raw:
        return None
    job = Job(
        id=raw["id"],
        status=JobStatus(raw["status"]),
        model=raw.get("model", ""),
        created_at=float(raw["created_at"]),
        expires_at=float(raw["expires_at"]) if raw.get("expires_at") else None,
        started_at=float(raw["started_at"]) if raw.get("started_at") else None,
        finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None,
        attempts=int(raw.get("attempts", "0")),
        batch_size=int(raw["batch_rows"]) if raw.get("batch_rows") else None,
        metadata=json.loads(raw.get("metadata") or "{}"),
        lane=raw.get("queue") or None,
        batch_id=raw.get("batch_id") or None,
        result=ChatCompletion.model_validate_json(raw["result"]) if raw.get("result") else None,
        error=JobError.model_validate_json(raw["error"]) if raw.get("error") else None,
    )
    request = ChatCompletionRequest.model_validate_json(raw["request"])
    return JobRecord(
        job=job,
        request=request,
        queue=raw.get("queue", ""),
        batch_id=raw.get("batch_id", ""),
        custom_id=raw.get("custom_id", ""),
        worker=raw.get("worker", ""),
        timeout_s=float(raw["timeout_s"]) if raw.get("timeout_s") else None,
        owner=raw.get("owner", ""),
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        publish_tokens=raw.get(NO_TOKENS[0]) != NO_TOKENS[1],
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


class JobStore:
    """Blocking store, used by the worker child."""

    def __init__(self, client: redis.Redis, ttl: int, audit_log: audit.AuditLog | None = None) -> None:
        self.r = client
        self.ttl = ttl
        self.audit_log = audit_log
        self._transition = client.register_script(_TRANSITION_LUA)
        self._pop = client.register_script(_POP_LUA)
        self._tidy = client.register_script(_TIDY_LUA)
        self._reap = client.register_script(_REAP_LUA)

    def pop_ready(self, queues: Sequence[str], worker: str) -> str | None:
        """The next ready job id from the first of `queues` (priority order) that has one,
        kept in `worker`'s processing list (see `pop_window`)."""
        ids = self.pop_window(queues, 1, worker)
        return ids[0] if ids else None

    def pop_window(self, queues: Sequence[str], count: int, worker: str) -> list[str]:
        """Up to `count` ready ids off the first of `queues` that has any, into `worker`'s
        processing list: until `end_claim` (those it does not run) or their job ends (those
        it runs). If `worker` dies first, `reap` puts them back."""
        pop_keys = [keys.processing(worker), keys.PROCESSING_WORKERS, *(keys.ready(q) for q in queues)]
        return cast(list[str], self._pop(keys=pop_keys, args=[count, self.ttl, worker]))

    def end_claim(self, worker: str) -> None:
        """The batch is filled: the ids `worker` took and does not run go back to the head
        of their lanes in their order (queued ones) or leave its list (the rest)."""
        self._tidy(keys=[keys.processing(worker)], args=[worker, self.ttl])

    def worker_alive(self, worker: str) -> bool:
        return bool(worker) and bool(self.r.exists(keys.worker(worker)))

    def reap(self) -> int:
        """For every worker whose heartbeat lapsed: its queued ids back at the head of their
        lanes, the jobs it was running to RESEND; returns how many it moved there."""
        moved = 0
        for worker in cast(set[str], self.r.smembers(keys.PROCESSING_WORKERS)):
            if not self.r.exists(keys.worker(worker)):
                moved += self._reap_one(worker, own=False)
        return moved

    def settle(self, worker: str) -> int:
        """The same for a live worker between two tasks, whose list should be empty then: a
        task that ended without ending its jobs (Redis went away mid-batch) leaves them
        running on a worker that is alive but runs nothing, which no reaper would take."""
        return self._reap_one(worker, own=True)

    def _reap_one(self, worker: str, own: bool) -> int:
        job_keys = [keys.processing(worker), keys.PROCESSING_WORKERS, keys.worker(worker), keys.RESEND]
        return int(self._reap(keys=job_keys, args=[worker, self.ttl, "1" if own else "0"]))

    def pending_resends(self, limit: int = 1000) -> list[tuple[str, str]]:
        """(job id, lane) of the jobs waiting to be sent again (`resent` once sent)."""
        entries = cast(list[str], self.r.lrange(keys.RESEND, 0, limit - 1))
        return [(job_id, lane) for job_id, _, lane in (e.partition("|") for e in entries)]

    def resent(self, job_id: str, lane: str) -> None:
        self.r.lrem(keys.RESEND, 0, f"{job_id}|{lane}")

    def create(self, request: ChatCompletionRequest, queue: str, prompt_tokens: int) -> str:
        job_id = new_job_id()
        fields = encode_new(job_id, request, queue, time.time(), prompt_tokens)
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

    def status(self, job_id: str) -> JobStatus | None:
        """Just the status: cheaper than `get` for the many messages that find their job
        already run by a batch-mate."""
        return self.statuses([job_id])[0]

    def statuses(self, job_ids: list[str]) -> list[JobStatus | None]:
        """Several statuses in one round trip (the worker parent re-checks held messages)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "status")
        return [JobStatus(raw) if raw else None for raw in cast(list[str | None], pipe.execute())]

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

    def apply(self, moves: list[Move]) -> list[TransitionResult]:
        """Each move is atomic (one script call); a batch's moves share one round trip."""
        if not moves:
            return []
        pipe = self.r.pipeline(transaction=False)
        now = time.time()
        for m in moves:
            job_keys, args = _move_call(m, now, self.ttl)
            self._transition(keys=job_keys, args=args, client=pipe)
        done = [_parse(reply, m, now) for reply, m in zip(pipe.execute(), moves, strict=True)]
        for m, d in zip(moves, done, strict=True):
            if d.finished is not None and self.audit_log is not None:
                _audit(self.audit_log, m, d, self._messages(m.job_id) if self.audit_log.content else None)
        return done

    def _messages(self, job_id: str) -> Any:
        return _request_messages(cast(str | None, self.r.hget(keys.job(job_id), "request")))


class AsyncJobStore:
    """Non-blocking twin for the API; shares the encoding and the script above."""

    def __init__(self, client: aredis.Redis, ttl: int, audit_log: audit.AuditLog | None = None) -> None:
        self.r = client
        self.ttl = ttl
        self.audit_log = audit_log
        self._transition = client.register_script(_TRANSITION_LUA)

    async def create(
        self,
        request: ChatCompletionRequest,
        queue: str,
        prompt_tokens: int,
        extra: dict[str, str] | None = None,
        message: Callable[[str], str] | None = None,
    ) -> Job:
        """The record, its first event and (given `message`, which builds the broker message
        for a job id) the task message and the ready-list entry, in one MULTI: a job is never
        recorded without being enqueued, nor enqueued without a record."""
        job_id = new_job_id()
        fields = {**encode_new(job_id, request, queue, time.time(), prompt_tokens), **(extra or {})}
        async with self.r.pipeline(transaction=True) as pipe:
            _queue_create(pipe, job_id, fields, self.ttl)
            if message is not None:
                pipe.lpush(queue, message(job_id))
                pipe.rpush(keys.ready(queue), job_id)
                pipe.expire(keys.ready(queue), self.ttl)
            await pipe.execute()
        record = decode(fields)
        assert record is not None
        return record.job

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
        job_keys, args = _move_call(move, now, self.ttl)
        done = _parse(await self._transition(keys=job_keys, args=args), move, now)
        if done.finished is not None and self.audit_log is not None:
            messages = None
            if self.audit_log.content:
                messages = _request_messages(cast(str | None, await self.r.hget(keys.job(job_id), "request")))
            _audit(self.audit_log, move, done, messages)
        return done

    async def create_batch_jobs(
        self, jobs: list[tuple[str, ChatCompletionRequest, int, dict[str, str]]], queue: str
    ) -> None:
        """Records for batch lines under deterministic ids; ids that already exist (a
        dispatcher that restarted mid-chunk) are kept as they are."""
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id, *_ in jobs:
                pipe.exists(keys.job(job_id))
            present = await pipe.execute()
        now = time.time()
        async with self.r.pipeline(transaction=True) as pipe:
            for (job_id, request, prompt_tokens, extra), exists in zip(jobs, present, strict=True):
                if not exists:
                    fields = {**encode_new(job_id, request, queue, now, prompt_tokens), **extra}
                    _queue_create(pipe, job_id, fields, self.ttl)
            await pipe.execute()
