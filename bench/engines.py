"""Static vs continuous batching, the engine called directly (no queue), side by side in
one run: the same requests through `SwiftEngine.generate` (static batches of MAX_BATCH_SIZE
rows, each row with its own limit) and through `SwiftContinuousEngine.generate` (the same rows
through transformers' continuous-batching loop, MAX_BATCH_SIZE at a time). Greedy, so both
sides do the same work. Three output-length shapes: every request at one length; lengths
drawn from a wide range; and a model that says EOS at random points.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from bench._stack import bench_model, bench_settings
from bench.common import prompts
from workers.engine import GenParams, GenRequest
from workers.engines import load_engine

WORKLOADS = {
    # name: (max_tokens of request i, model says EOS)
    "uniform-64": (lambda i: 64, False),
    "wide-16-256": (lambda i: 16 + (i * 37) % 241, False),
    "eos-random": (lambda i: 256, True),
}


def _requests(n: int, workload: str) -> list[GenRequest]:
    limit, _eos = WORKLOADS[workload]
    return [
        GenRequest(
            messages=[{"role": "user", "content": p}], params=GenParams(max_tokens=limit(i), temperature=0)
        )
        for i, p in enumerate(prompts(n))
    ]


def _tps(mode: str, size: str, workload: str, n: int, batch: int) -> float:
    model = bench_model(size, eos_free=not WORKLOADS[workload][1])
    engine = load_engine(bench_settings(model, batch, mode))
    reqs = _requests(n, workload)
    engine.generate(reqs[:batch])  # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(reqs)
    wall = time.perf_counter() - t0
    toks = sum(o.completion_tokens for o in outs if not isinstance(o, Exception))
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    del engine
    gc.collect()
    return toks / wall


def engines(n: int = 64, batch: int = 16, sizes: tuple[str, ...] = ("tiny", "small")) -> dict[str, Any]:
    res: dict[str, Any] = {"n": n, "max_batch_size": batch, "runs": {}}
    for size in sizes:
        for workload in WORKLOADS:
            static = _tps("static", size, workload, n, batch)
            cont = _tps("continuous", size, workload, n, batch)
            key = f"{size}/{workload}"
            res["runs"][key] = {
                "static_tokens_per_s": round(static, 1),
                "continuous_tokens_per_s": round(cont, 1),
                "continuous_over_static": round(cont / static, 3),
            }
            print(
                f"  {key}: static {static:.0f} tok/s, continuous {cont:.0f} tok/s (x{cont / static:.2f})",
                flush=True,
            )
    return res
