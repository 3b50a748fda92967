"""GET /v1/jobs: a caller's jobs, newest first, with filters.

Why an index per key (keys.owner_jobs) and a scan cap: a request must cost what its page
costs, never a walk over the keyspace. The index is ranked by creation time; a page starts
after the cursor's rank, reads the filter fields of a chunk of ids at a time, and stops at
`limit` matches or after MAX_SCAN ids (a rare filter over a long history then returns a
short page with `has_more`, and its `last_id` continues where it stopped). Batch lines are
not in the index: `batch_id=` lists them from their batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aredis

from api.errors import APIError
from core import keys, lanes
from core.job_store import decode
from schemas.jobs import Job, JobStatus

MAX_SCAN = 2000
CHUNK = 200
_FIELDS = ("status", "queue", "metadata", "owner")


@dataclass(frozen=True)
class JobFilter:
    status: JobStatus | None = None
    lane: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def matches(self, status: str | None, lane: str | None, metadata: str | None) -> bool:
        if status is None or (self.status is not None and status != self.status.value):
            return False
        if self.lane is not None and lanes.parts(lane or "")[0] != self.lane:
            return False  # `lane` names the queue (inferq.jobs) whatever the model
        if self.metadata:
            have = json.loads(metadata or "{}")
            return all(have.get(k) == v for k, v in self.metadata.items())
        return True


@dataclass(frozen=True)
class Page:
    data: list[Job]
    has_more: bool
    #: where the next page starts (the last id looked at)
    cursor: str | None


async def _ids(
    client: aredis.Redis, scope: str | None, batch_id: str | None, start: int, n: int
) -> list[str]:
    if batch_id:  # dispatch order, newest first
        return cast(list[str], await client.lrange(keys.batch_jobs(batch_id), -start - n, -start - 1))[::-1]
    index = keys.owner_jobs(scope) if scope else keys.JOB_INDEX
    return cast(list[str], await client.zrevrange(index, start, start + n - 1))


async def _start(client: aredis.Redis, scope: str | None, batch_id: str | None, after: str | None) -> int:
    if not after:
        return 0
    if batch_id:
        pos = cast(int | None, await client.lpos(keys.batch_jobs(batch_id), after))
        length = await client.llen(keys.batch_jobs(batch_id))
        rank = None if pos is None else length - 1 - pos
    else:
        index = keys.owner_jobs(scope) if scope else keys.JOB_INDEX
        rank = cast(int | None, await client.zrevrank(index, after))
    if rank is None:
        raise APIError(400, f"No job '{after}' to list after (unknown or expired).", param="after")
    return int(rank) + 1


async def list_jobs(
    client: aredis.Redis,
    scope: str | None,
    limit: int,
    after: str | None,
    batch_id: str | None,
    flt: JobFilter,
) -> Page:
    """`scope` None: everyone's jobs (keys off); else that owner's only."""
    pos = await _start(client, scope, batch_id, after)
    found: list[str] = []
    cursor: str | None = None
    scanned = 0
    while scanned < MAX_SCAN and len(found) < limit:
        ids = await _ids(client, scope, batch_id, pos, min(CHUNK, MAX_SCAN - scanned))
        if not ids:
            break
        async with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(keys.job(job_id), _FIELDS)
            rows = await pipe.execute()
        for job_id, (status, lane, metadata, owner) in zip(ids, rows, strict=True):
            pos += 1
            scanned += 1
            cursor = job_id
            if scope is not None and owner != scope:
                continue  # a batch's lines belong to its owner; the index is the owner's already
            if flt.matches(status, lane, metadata):
                found.append(job_id)
                if len(found) == limit:
                    break
    more = bool(await _ids(client, scope, batch_id, pos, 1))
    async with client.pipeline(transaction=False) as pipe:
        for job_id in found:
            pipe.hgetall(keys.job(job_id))
        records = [decode(raw) for raw in await pipe.execute()]
    return Page([r.job for r in records if r is not None], more, cursor if more else None)
