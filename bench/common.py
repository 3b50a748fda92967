"""Helpers shared by the benchmarks: request bodies, submitting, waiting, reading results."""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

from bench.loadgen import post_many
from core import keys, metrics


def prompts(n: int) -> list[str]:
    """Mixed prompt lengths, deterministic."""
    return [f"request {i}: " + " ".join(["tell me about gpus"] * (1 + (i * 7) % 13)) for i in range(n)]


async def post_all(
    base: str, bodies: list[dict[str, Any]], concurrency: int = 64
) -> tuple[list[str], list[float]]:
    out, lat = await post_many(base, "/v1/jobs", bodies, concurrency)
    return [o["id"] for o in out], lat


def wait_done(r: redis.Redis, ids: list[str], timeout: float = 1800) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} jobs unfinished")
        pipe = r.pipeline(transaction=False)
        for j in pending:
            pipe.hget(keys.job(j), "status")
        states = pipe.execute()
        pending = [
            j
            for j, s in zip(pending, states, strict=True)
            if s not in (b"succeeded", b"failed", "succeeded", "failed")
        ]
        if pending:
            time.sleep(0.2)
    pipe = r.pipeline(transaction=False)
    for j in ids:
        pipe.hgetall(keys.job(j))
    return [
        {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in rec.items()
        }
        for rec in pipe.execute()
    ]


def last_finish(records: list[dict[str, str]]) -> float:
    """When the last job finished, by the worker's clock (same machine): the waiting loop's
    polling interval does not enter the figure."""
    return max(float(rec["finished_at"]) for rec in records)


def batches(records: list[dict[str, str]]) -> list[tuple[float, float, int]]:
    """(start, end, rows) of each engine batch, from the job records: the jobs claimed
    together share a `started_at`, and a claim that starts while another runs belongs to
    the same batch (the task's own job is claimed first, its batch-mates just after)."""
    claims: dict[str, list[float]] = {}
    for rec in records:
        c = claims.setdefault(rec["started_at"], [float(rec["started_at"]), 0.0, 0])
        c[1] = max(c[1], float(rec["finished_at"]))
        c[2] += 1
    out: list[list[float]] = []
    for c in sorted(claims.values()):
        if out and c[0] < out[-1][1]:
            out[-1][1] = max(out[-1][1], c[1])
            out[-1][2] += c[2]
        else:
            out.append(list(c))
    return [(s, e, int(n)) for s, e, n in out]


def busy_fraction(records: list[dict[str, str]]) -> float:
    """Share of the span from the first job's start to the last one's finish in which some
    job was running: below 1 the engine sat idle between batches (a starved or stalled
    worker), where a low throughput with a busy fraction near 1 means slow batches."""
    runs = batches(records)
    span = max(e for _, e, _ in runs) - runs[0][0]
    return sum(e - s for s, e, _ in runs) / max(span, 1e-9)


def tokens(records: list[dict[str, str]]) -> int:
    return sum(
        json.loads(rec["result"])["usage"]["completion_tokens"] for rec in records if rec.get("result")
    )


def stats(r: redis.Redis) -> tuple[int, int]:
    """(engine calls, rows they ran) so far: the metrics hash's rows histogram."""
    raw = {_text(k): _text(v) for k, v in r.hgetall(keys.METRICS).items()}
    rows = metrics.decode(raw, lanes=[]).histograms[("batch_rows", "")]
    return rows.count, int(rows.total)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def field_all(r: redis.Redis, field: str) -> list[str]:
    """One field of every job record on this (benchmark-only) server."""
    names = list(r.scan_iter(match=keys.job("*"), count=1000))
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.hget(name, field)
    return cast(list[str], pipe.execute())
