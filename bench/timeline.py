"""`inferq bench timeline`: what the engine did, batch by batch, in consecutive /v1/jobs
rounds on one stack. A diagnostic, not a figure with a goal: it tells a slow round's
causes apart. An engine idle between batches (busy < 1) points at the queue; batches
smaller than MAX_BATCH_SIZE point at the collect window or at ingest; full batches that
take longer than the same batches in a later round point at the engine's own first-time
costs (on a GPU: work done once per new tensor shape).

Why it exists: on an H200 the first /v1/jobs round of the efficiency benchmark ran at 0.6
of the later rounds' speed, and only a per-batch record showed why.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import redis

from bench._stack import stack
from bench.common import batches, busy_fraction, last_finish, post_all, prompts, stats, tokens, wait_done
from bench.efficiency import _bodies


def timeline(
    n: int = 256, max_tokens: int = 32, batch: int = 8, size: str = "tiny", rounds: int = 3
) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    with stack(size=size, INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _model, env, _sup):
        r = redis.Redis.from_url(env["INFERQ_REDIS_URL"], decode_responses=True)
        bodies = _bodies(prompts(n), max_tokens)
        for i in range(rounds):
            t0 = time.time()
            b0, _ = stats(r)
            ids, _ = asyncio.run(post_all(base, bodies))
            posted_s = time.time() - t0
            records = wait_done(r, ids)
            b1, _ = stats(r)
            runs = batches(records)
            full = [e - s for s, e, rows in runs if rows == batch]
            res = {
                "tokens_per_s": round(tokens(records) / (last_finish(records) - t0), 1),
                "posted_s": round(posted_s, 3),
                "first_start_s": round(runs[0][0] - t0, 3),
                "busy": round(busy_fraction(records), 3),
                "engine_batches": b1 - b0,
                "rows": [rows for _, _, rows in runs],
                "durations_s": [round(e - s, 3) for s, e, _ in runs],
                "gaps_s": [round(runs[k + 1][0] - runs[k][1], 4) for k in range(len(runs) - 1)],
                "full_batch_median_s": round(statistics.median(full), 3) if full else None,
            }
            out.append(res)
            print(
                f"round {i + 1}: {res['tokens_per_s']:.0f} tok/s, posted in {posted_s:.2f} s, first batch "
                f"after {res['first_start_s']:.2f} s, engine busy {res['busy']:.2f}, full batches' median "
                f"{res['full_batch_median_s']} s\n  rows      {res['rows']}\n  durations "
                f"{res['durations_s']}\n  gaps      {res['gaps_s']}",
                flush=True,
            )
    return {"model_size": size, "n": n, "max_tokens": max_tokens, "max_batch_size": batch, "rounds": out}
