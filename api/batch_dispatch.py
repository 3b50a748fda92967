"""OpenAI-compatible batches: the batch record, and the dispatcher that feeds its lines to
the batch lane.

Why a dispatcher in the API (not one Celery message per line up front): a 50,000-line file
must start within seconds without putting 50,000 messages in the broker. The dispatcher
validates lines as it reads them and keeps at most `batch_window` of them in the lane;
its cursor lives in Redis, so any API process can resume a batch after a restart (a lock
with a short TTL keeps it to one dispatcher per batch). Results are not collected here:
each job appends its own output/error line atomically with its final status (see
`core/job_store.py`), so a crash loses no finished line and counts never drift.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import redis.asyncio as aredis
from celery import Celery
from pydantic import ValidationError

from api import file_store as files
from api import submit as service
from api.errors import APIError
from api.fleet import Fleet
from api.hooks import screen
from api.publish import task_message
from core import batch_lines, keys, lanes, webhooks
from core.auth import scope_of
from core.config import Settings
from core.job_store import NO_TOKENS, AsyncJobStore, BatchLine
from core.storage import Storage
from schemas.batches import Batch, BatchCreate, BatchError, BatchErrors, BatchUsage, RequestCounts
from schemas.jobs import JobStatus
from schemas.openai import ChatCompletionRequest
from tasks.app import RUN_JOB

logger = logging.getLogger(__name__)

TERMINAL = {"completed", "failed", "expired", "cancelled"}
_COUNTERS = ("total", "completed", "failed", "done_lines", "dispatched", "input_tokens", "output_tokens")
_TIMES = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_MAX_LISTED_ERRORS = 100
_LOCK_MS = 10_000
#: a finalization that fails (storage down, say) is tried again 5 s later, then 10, 20 ... 5 min
_FINALIZE_RETRY_S = 5.0
_FINALIZE_RETRY_MAX_S = 300.0


@dataclass
class _Retry:
    """A batch whose finalization failed: when to try again, and the causes already logged."""

    at: float  # time.monotonic()
    delay: float
    causes: set[str] = field(default_factory=set)


def batch_ttl(settings: Settings) -> int:
    return 24 * 3600 + settings.result_ttl_s


def decode(raw: dict[str, str]) -> Batch:
    n = {k: int(raw.get(k, "0") or 0) for k in _COUNTERS}
    errors = json.loads(raw.get("errors") or "[]")
    return Batch(
        id=raw["id"],
        endpoint=raw["endpoint"],
        input_file_id=raw["input_file_id"],
        completion_window=raw["completion_window"],
        status=cast(Any, raw["status"]),
        created_at=int(raw["created_at"]),
        output_file_id=raw.get("output_file_id") or None,
        error_file_id=raw.get("error_file_id") or None,
        errors=BatchErrors(data=[BatchError(**e) for e in errors]) if errors else None,
        request_counts=RequestCounts(total=n["total"], completed=n["completed"], failed=n["failed"]),
        usage=BatchUsage(
            input_tokens=n["input_tokens"],
            output_tokens=n["output_tokens"],
            total_tokens=n["input_tokens"] + n["output_tokens"],
        ),
        metadata=json.loads(raw["metadata"]) if raw.get("metadata") else None,
        retry_of=raw.get("retry_of") or None,
        **cast(Any, {t: int(raw[t]) for t in _TIMES if raw.get(t)}),
    )


class BatchService:
    def __init__(
        self,
        r: aredis.Redis,
        store: AsyncJobStore,
        storage: Storage,
        settings: Settings,
        celery: Celery,
        fleet: Fleet,
    ) -> None:
        self.r, self.store, self.storage, self.settings, self.celery = r, store, storage, settings, celery
        self.fleet = fleet
        self.ttl = batch_ttl(settings)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.holder = uuid.uuid4().hex
        self.finalize_retry_s, self.finalize_retry_max_s = _FINALIZE_RETRY_S, _FINALIZE_RETRY_MAX_S
        self._finalize_retry: dict[str, _Retry] = {}

    # --- the batch object -------------------------------------------------------------
    def _scope(self, owner: str) -> str | None:
        return scope_of(owner, self.settings.auth_enabled)

    async def create(self, body: BatchCreate, retry_of: str | None = None, owner: str = "") -> Batch:
        _, lines = await files.get(self.r, body.input_file_id, self._scope(owner))
        await service.reserve(self.store, owner, lines, self.settings)  # every line counts against the key
        batch_id = f"batch_{uuid.uuid4().hex}"
        now = int(time.time())
        fields = {
            "id": batch_id,
            "endpoint": body.endpoint,
            "input_file_id": body.input_file_id,
            "completion_window": body.completion_window,
            "status": "validating",
            "created_at": str(now),
            "expires_at": str(now + 24 * 3600),
            "total": str(lines),
            "cursor": "0",
            "line_no": "0",
            "metadata": json.dumps(body.metadata) if body.metadata else "",
            "retry_of": retry_of or "",
            "owner": owner,
        }
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch(batch_id), mapping=cast(Any, fields))
            pipe.expire(keys.batch(batch_id), self.ttl)
            pipe.sadd(keys.ACTIVE_BATCHES, batch_id)
            pipe.expire(keys.ACTIVE_BATCHES, self.ttl)
            # scored to the microsecond: batches made in one second still list newest first
            pipe.zadd(keys.BATCH_INDEX, {batch_id: time.time()})
            pipe.expire(keys.BATCH_INDEX, self.ttl)
            await pipe.execute()
        self.ensure_dispatcher(batch_id)
        await self.store.replicated(keys.batch(batch_id))  # INFERQ_REDIS_WAIT_REPLICAS
        return decode(fields)

    async def get(self, batch_id: str, owner: str = "") -> Batch:
        raw = await self.r.hgetall(keys.batch(batch_id))
        scope = self._scope(owner)
        if not raw or (scope is not None and raw.get("owner", "") != scope):
            raise APIError(
                404,
                f"No batch with id '{batch_id[:80]}'.",
                param="batch_id",
                code="batch_not_found",
                type_="not_found_error",
            )
        return decode(cast(dict[str, str], raw))

    async def list_batches(self, limit: int, after: str | None, owner: str = "") -> tuple[list[Batch], bool]:
        scope = self._scope(owner)
        ids = cast(list[str], await self.r.zrevrange(keys.BATCH_INDEX, 0, -1))
        if after and after in ids:
            ids = ids[ids.index(after) + 1 :]
        out: list[Batch] = []
        more = False
        for batch_id in ids:
            raw = cast(dict[str, str], await self.r.hgetall(keys.batch(batch_id)))
            if not raw or (scope is not None and raw.get("owner", "") != scope):
                continue
            if len(out) == limit:
                more = True
                break
            out.append(decode(raw))
        return out, more

    async def cancel(self, batch_id: str, owner: str = "") -> Batch:
        batch = await self.get(batch_id, owner)
        if batch.status in TERMINAL or batch.status == "finalizing":
            raise APIError(
                409, f"Batch '{batch_id}' is already {batch.status}.", param="batch_id", code="batch_finished"
            )
        if batch.status != "cancelling":
            await self.r.hset(
                keys.batch(batch_id), mapping={"status": "cancelling", "cancelling_at": str(int(time.time()))}
            )
        self.ensure_dispatcher(batch_id)
        return await self.get(batch_id)

    async def retry(self, batch_id: str, owner: str = "") -> Batch:
        """Our extension: a new batch from the failed and not-run lines of a finished one."""
        batch = await self.get(batch_id, owner)
        if batch.status not in TERMINAL:
            raise APIError(
                409,
                f"Batch '{batch_id}' is still {batch.status}; retry it once it has finished.",
                param="batch_id",
                code="batch_not_finished",
            )
        wanted: set[str] = set()
        async for line in self.result_lines(batch_id, output=False):
            custom_id = json.loads(line).get("custom_id")
            if custom_id:
                wanted.add(custom_id)
        if not wanted:
            raise APIError(
                400,
                f"Batch '{batch_id}' has no failed or expired lines to retry.",
                param="batch_id",
                code="nothing_to_retry",
            )
        file_id, size, count = await anyio.to_thread.run_sync(self._copy_lines, batch.input_file_id, wanted)
        await files.register(
            self.r, self.settings, file_id, f"retry-of-{batch_id}.jsonl", "batch", size, count
        )
        body = BatchCreate(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=batch.metadata,
        )
        return await self.create(body, retry_of=batch_id, owner=owner)

    def _copy_lines(self, input_file_id: str, wanted: set[str]) -> tuple[str, int, int]:
        file_id = files.new_file_id()
        size = count = 0
        with self.storage.reader(input_file_id) as src, self.storage.writer(file_id) as out:
            for raw in src:
                try:
                    custom_id = json.loads(raw).get("custom_id")
                except (ValueError, AttributeError):
                    continue
                if custom_id in wanted:
                    wanted.discard(custom_id)  # a duplicate custom_id is retried once
                    data = raw if raw.endswith(b"\n") else raw + b"\n"
                    out.write(data)
                    size += len(data)
                    count += 1
        return file_id, size, count

    async def result_lines(self, batch_id: str, *, output: bool) -> AsyncIterator[str]:
        """Lines finished so far (durable in Redis while the batch lives), else the final file.
        Callers check who may read the batch first: the dispatcher, which finalizes it, acts
        for no key."""
        key = keys.batch_output(batch_id) if output else keys.batch_errors(batch_id)
        if await self.r.exists(key):
            start = 0
            while page := cast(list[str], await self.r.lrange(key, start, start + 999)):
                for line in page:
                    yield line
                start += len(page)
            return
        file_id = cast(
            str | None,
            await self.r.hget(keys.batch(batch_id), "output_file_id" if output else "error_file_id"),
        )
        if file_id and self.storage.exists(file_id):
            with self.storage.reader(file_id) as fh:
                for raw in fh:
                    yield raw.decode().rstrip("\n")

    # --- dispatch ---------------------------------------------------------------------
    def ensure_dispatcher(self, batch_id: str) -> None:
        task = self._tasks.get(batch_id)
        if task is None or task.done():
            self._tasks[batch_id] = asyncio.get_running_loop().create_task(self._dispatch(batch_id))

    async def resume_all(self) -> None:
        """Picks up batches whose dispatcher died with its API process."""
        while True:
            try:
                for batch_id in cast(list[str], await self.r.smembers(keys.ACTIVE_BATCHES)):
                    self.ensure_dispatcher(batch_id)
            except Exception as exc:  # Redis down: try again later
                logger.warning("batch resume scan failed: %s", exc)
            await asyncio.sleep(5)

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()

    async def _dispatch(self, batch_id: str) -> None:
        lock = keys.batch_lock(batch_id)
        if not await self.r.set(lock, self.holder, nx=True, px=_LOCK_MS):
            return  # another API process is on it
        try:
            while await self._step(batch_id):
                await self.r.set(lock, self.holder, px=_LOCK_MS)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("dispatcher for %s failed; it will be resumed", batch_id)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    if await self.r.get(lock) == self.holder:
                        await self.r.delete(lock)
                except Exception:  # the lock expires by itself
                    pass

    async def _step(self, batch_id: str) -> bool:
        """One round of dispatch; False when the batch is done."""
        raw = cast(dict[str, str], await self.r.hgetall(keys.batch(batch_id)))
        if not raw or raw["status"] in TERMINAL:
            await self.r.srem(keys.ACTIVE_BATCHES, batch_id)
            self._finalize_retry.pop(batch_id, None)
            return False
        status = raw["status"]
        if status == "finalizing":  # a finalization that failed: again, as what it was finalizing to
            return await self._try_finalize(batch_id, raw.get("finalizing_as") or "completed", raw)
        n = {k: int(raw.get(k, "0") or 0) for k in _COUNTERS}
        if status == "validating":
            await self.r.hset(
                keys.batch(batch_id),
                mapping={"status": "in_progress", "in_progress_at": str(int(time.time()))},
            )
            status = "in_progress"
        if status == "in_progress" and time.time() > int(raw["expires_at"]):
            status = "expiring"
        if status in ("cancelling", "expiring"):
            code = "batch_cancelled" if status == "cancelling" else "batch_expired"
            await self._stop_lines(batch_id, raw, code)
            raw = cast(dict[str, str], await self.r.hgetall(keys.batch(batch_id)))
            if int(raw.get("done_lines", 0)) >= int(raw["total"]):
                final = "cancelled" if status == "cancelling" else "expired"
                return await self._try_finalize(batch_id, final, raw)
            await asyncio.sleep(0.2)
            return True
        if raw.get("dispatch_done") != "1" and n["dispatched"] - n["done_lines"] < self.settings.batch_window:
            await self._dispatch_chunk(batch_id, raw)
            return True
        if raw.get("dispatch_done") == "1" and n["done_lines"] >= n["total"]:
            return await self._try_finalize(batch_id, "completed", raw)
        await asyncio.sleep(0.1)
        return True

    async def _dispatch_chunk(self, batch_id: str, raw: dict[str, str]) -> None:
        cursor, line_no = int(raw["cursor"]), int(raw["line_no"])
        chunk, cursor, eof = await anyio.to_thread.run_sync(
            self._read_lines, raw["input_file_id"], cursor, line_no
        )
        jobs: list[tuple[str, ChatCompletionRequest, int, dict[str, str]]] = []
        bad: list[tuple[int, str | None, str]] = []
        for no, text in chunk:
            line_no = no
            parsed = await self._validate(batch_id, no, text)
            if len(parsed) == 2:
                bad.append((no, parsed[0], parsed[1]))
            else:
                jobs.append(parsed)
        if jobs:
            await self.store.create_batch_jobs(jobs)
            await self._enqueue(jobs)
        async with self.r.pipeline(transaction=True) as pipe:
            for _no, _custom_id, line in bad:
                pipe.rpush(keys.batch_errors(batch_id), line)
            if jobs:
                pipe.rpush(keys.batch_jobs(batch_id), *[j[0] for j in jobs])
            for key in (
                keys.batch_errors(batch_id),
                keys.batch_jobs(batch_id),
                keys.batch_custom_ids(batch_id),
            ):
                pipe.expire(key, self.ttl)
            pipe.hincrby(keys.batch(batch_id), "failed", len(bad))
            pipe.hincrby(keys.batch(batch_id), "done_lines", len(bad))
            pipe.hincrby(keys.batch(batch_id), "dispatched", len(chunk))
            pipe.hset(
                keys.batch(batch_id),
                mapping={
                    "cursor": str(cursor),
                    "line_no": str(line_no),
                    "dispatch_done": "1" if eof else "0",
                },
            )
            await pipe.execute()
        if bad:
            await self._record_errors(batch_id, bad)
            await self.store.release_active(raw.get("owner", ""), len(bad))

    async def _enqueue(self, jobs: list[tuple[str, ChatCompletionRequest, int, dict[str, str]]]) -> None:
        """The lines' messages and ready ids, on the batch lane of each line's model."""
        by_lane: dict[str, list[tuple[str, str]]] = {}
        for job_id, request, _tokens, fields in jobs:
            by_lane.setdefault(fields["queue"], []).append((job_id, request.model))
        async with self.r.pipeline(transaction=False) as pipe:
            for lane, items in by_lane.items():
                pipe.lpush(lane, *[task_message(self.celery, RUN_JOB, j, lane, model) for j, model in items])
                pipe.rpush(keys.ready(lane), *[j for j, _ in items])
                pipe.expire(keys.ready(lane), self.ttl)
            await pipe.execute()

    def _read_lines(
        self, file_id: str, cursor: int, line_no: int
    ) -> tuple[list[tuple[int, bytes]], int, bool]:
        out: list[tuple[int, bytes]] = []
        with self.storage.reader(file_id) as fh:
            fh.seek(cursor)
            while len(out) < self.settings.batch_dispatch_chunk:
                raw = fh.readline()
                if not raw:
                    return out, fh.tell(), True
                line_no += 1
                if raw.strip():
                    out.append((line_no, raw))
            eof = fh.read(1) == b""
            return out, fh.tell() - (0 if eof else 1), eof

    async def _validate(
        self, batch_id: str, no: int, raw: bytes
    ) -> tuple[str, ChatCompletionRequest, int, dict[str, str]] | tuple[str | None, str]:
        def bad(
            msg: str,
            custom_id: str | None = None,
            code: str = "invalid_request",
            status: int = 400,
            param: str | None = None,
        ) -> tuple[str | None, str]:
            text = batch_lines.request_failure(
                custom_id, None, status, f"line {no}: {msg}", code, param=param
            )
            return custom_id, text

        try:
            item = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return bad("not valid UTF-8", code="invalid_json")
        except json.JSONDecodeError as exc:  # its own "line 1 column N" would be a second line number
            return bad(f"not valid JSON: {exc.msg} at column {exc.colno}", code="invalid_json")
        except ValueError as exc:
            return bad(f"not valid JSON ({exc})", code="invalid_json")
        if not isinstance(item, dict):
            return bad("not a JSON object", code="invalid_json")
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return bad("missing custom_id (a non-empty string)", param="custom_id")
        if item.get("method", "POST") != "POST":
            return bad(f"method must be POST, not {item.get('method')!r}", custom_id, param="method")
        if item.get("url") != "/v1/chat/completions":
            return bad(f"url must be /v1/chat/completions, not {item.get('url')!r}", custom_id, param="url")
        if not await self.r.sadd(keys.batch_custom_ids(batch_id), custom_id):
            return bad(
                f"duplicate custom_id {custom_id!r}", custom_id, code="duplicate_custom_id", param="custom_id"
            )
        try:
            request = ChatCompletionRequest.model_validate(item.get("body"))
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "body"
            return bad(f"invalid body.{field}: {err['msg']}", custom_id, param=f"body.{field}")
        if request.stream:
            return bad("body.stream must be false in a batch", custom_id, param="body.stream")
        try:  # the model's system prompt and the before-hooks first (api.hooks): a refusal is an error line
            request = await screen(request, self.settings, self.r, self.store.ttl)
            base = await self.fleet.route(request.model, queue_unserved=True)
            prepared, prompt_tokens = await service.prepare(
                request, self.settings, await self.fleet.counter(base)
            )
        except APIError as exc:
            return bad(
                exc.message,
                custom_id,
                code=exc.code or "invalid_request",
                status=exc.status,
                param=f"body.{exc.param}" if exc.param else None,
            )
        job_id = f"job_{batch_id.removeprefix('batch_')[:20]}l{no}"
        limits = service.job_limits(prepared, self.settings, expires=False)  # the batch window governs expiry
        owner = str(await self.r.hget(keys.batch(batch_id), "owner") or "")
        lane = lanes.lane(self.settings.queue_batch, base)
        extra = {"batch_id": batch_id, "custom_id": custom_id, "owner": owner, "queue": lane, **limits}
        extra[NO_TOKENS[0]] = NO_TOKENS[1]  # nobody follows a batch line's tokens
        return job_id, prepared, prompt_tokens, extra

    async def _record_errors(self, batch_id: str, bad: list[tuple[int, str | None, str]]) -> None:
        """The first lines that failed validation also show in the batch's `errors`, as OpenAI does."""
        current = json.loads(await self.r.hget(keys.batch(batch_id), "errors") or "[]")
        for no, _custom_id, line in bad:
            if len(current) >= _MAX_LISTED_ERRORS:
                break
            err = json.loads(line)["response"]["body"]["error"]
            current.append(
                {"code": err["code"], "message": err["message"], "param": err["param"], "line": no}
            )
        await self.r.hset(keys.batch(batch_id), "errors", json.dumps(current))

    async def _stop_lines(self, batch_id: str, raw: dict[str, str], code: str) -> None:
        """Cancel or expiry: dispatch nothing more, end queued jobs, stop running ones, and
        report every line that never ran."""
        message = (
            "The batch was cancelled before this request ran."
            if code == "batch_cancelled"
            else "The batch's completion window ended before this request ran."
        )
        if raw.get("dispatch_done") != "1":
            rest = await anyio.to_thread.run_sync(
                self._rest_custom_ids, raw["input_file_id"], int(raw["cursor"])
            )
            async with self.r.pipeline(transaction=True) as pipe:
                for custom_id in rest:
                    pipe.rpush(keys.batch_errors(batch_id), batch_lines.not_run(custom_id, code, message))
                pipe.expire(keys.batch_errors(batch_id), self.ttl)
                pipe.hincrby(keys.batch(batch_id), "done_lines", len(rest))
                pipe.hincrby(keys.batch(batch_id), "dispatched", len(rest))
                pipe.hset(keys.batch(batch_id), "dispatch_done", "1")
                await pipe.execute()
            await self.store.release_active(raw.get("owner", ""), len(rest))
        for job_id in cast(list[str], await self.r.lrange(keys.batch_jobs(batch_id), 0, -1)):
            record = await self.store.get(job_id)
            if record is None or record.status.terminal:
                continue
            if record.status is JobStatus.QUEUED:
                line = BatchLine(
                    batch_id, batch_lines.not_run(record.custom_id, code, message), False, "", self.ttl
                )
                res = await self.store.transition(job_id, JobStatus.CANCELLED, batch_line=line)
                if res.ok:
                    continue
            await self.store.request_cancel(job_id)

    def _rest_custom_ids(self, file_id: str, cursor: int) -> list[str | None]:
        out: list[str | None] = []
        with self.storage.reader(file_id) as fh:
            fh.seek(cursor)
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    custom_id = json.loads(raw).get("custom_id")
                except (ValueError, AttributeError):
                    custom_id = None
                out.append(custom_id if isinstance(custom_id, str) else None)
        return out

    async def _try_finalize(self, batch_id: str, final: str, raw: dict[str, str]) -> bool:
        """Finalizes the batch (False: the dispatcher is done), or waits a little while a failed
        try's backoff runs (True: step again; the dispatcher keeps the batch's lock meanwhile).
        A failure backs off 5 s, 10, 20 ... 5 min; its traceback is logged once per cause."""
        retry = self._finalize_retry.get(batch_id)
        if retry is not None and (wait := retry.at - time.monotonic()) > 0:
            await asyncio.sleep(min(wait, 1.0))  # the lock is renewed between steps
            return True
        try:
            await self._finalize(batch_id, final, raw)
        except Exception as exc:
            self._finalize_failed(batch_id, exc)
            return True
        self._finalize_retry.pop(batch_id, None)
        return False

    def _finalize_failed(self, batch_id: str, exc: Exception) -> None:
        retry = self._finalize_retry.get(batch_id)
        if retry is None:
            retry = self._finalize_retry[batch_id] = _Retry(0.0, self.finalize_retry_s)
        else:
            retry.delay = min(2 * retry.delay, self.finalize_retry_max_s)
        retry.at = time.monotonic() + retry.delay
        cause = f"{type(exc).__name__}: {exc}"
        if cause in retry.causes:
            logger.debug("batch %s: finalizing failed again (%s); next in %g s", batch_id, cause, retry.delay)
            return
        retry.causes.add(cause)
        logger.error(
            "batch %s could not be finalized (%s); trying again in %g s, then less often (up to every "
            "%g s); the same error is not logged again",
            batch_id,
            cause,
            retry.delay,
            self.finalize_retry_max_s,
            exc_info=exc,
        )

    async def _finalize(self, batch_id: str, final: str, raw: dict[str, str]) -> None:
        """`raw`: the batch record the step just read (its owner owns the files too)."""
        start = {"status": "finalizing", "finalizing_as": final}
        if not raw.get("finalizing_at"):  # a retry keeps the first try's time
            start["finalizing_at"] = str(int(time.time()))
        await self.r.hset(keys.batch(batch_id), mapping=cast(Any, start))
        ids: dict[str, str] = {}
        owner = raw.get("owner", "")
        for kind, output in (("output_file_id", True), ("error_file_id", False)):
            lines = [line async for line in self.result_lines(batch_id, output=output)]
            if not lines:
                continue
            file_id = files.new_file_id()
            data = ("\n".join(lines) + "\n").encode()
            await anyio.to_thread.run_sync(self._write, file_id, data)
            name = f"{batch_id}_{'output' if output else 'error'}.jsonl"
            await files.register(
                self.r, self.settings, file_id, name, "batch_output", len(data), len(lines), owner
            )
            ids[kind] = file_id
        stamp = {"completed": "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}[final]
        done: dict[str, str] = {"status": final, stamp: str(int(time.time())), **ids}
        async with self.r.pipeline(transaction=True) as pipe:  # the end and its webhook event at once
            pipe.hset(keys.batch(batch_id), mapping=cast(Any, done))
            pipe.srem(keys.ACTIVE_BATCHES, batch_id)
            webhooks.batch_ended(pipe, batch_id, final, owner, self.ttl)
            await pipe.execute()
        logger.info("batch %s %s", batch_id, final)

    def _write(self, file_id: str, data: bytes) -> None:
        with self.storage.writer(file_id) as fh:
            fh.write(data)
