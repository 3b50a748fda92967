"""`inferq bench stepcost`: what the token path costs the thread that drives generation, per
step of a 32-row batch, when steps come at a GPU's pace (one decode and one flush per step).

Why it matters: HF `generate` on a GPU is bound by the Python that launches each step, so
every millisecond the streamer and the sink take inside a step is a millisecond the GPU
waits. Measured on an H200 with the 0.5B model: a step takes 21-25 ms. Four variants side
by side, interleaved, on a real Valkey and the demo tokenizer: the shipped path (all rows
decoded in one call to the Rust tokenizer, one script call for all token events), per-row
decoding through transformers, a pipeline of one XADD per job, and both (the path before).
"""

from __future__ import annotations

import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench._stack import bench_model
from core import keys
from core.demo_model import DEMO_MODEL_TYPE, DEMO_TEMPLATE
from core.processes import Supervisor, free_port, port_open, valkey_argv, wait_for
from workers.streaming import StreamSink, Target


class PipelineSink(StreamSink):
    """The sink as it was: one XADD per job with pending text, in one pipeline."""

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        entries = [
            (
                self.targets[i].job_id,
                {
                    "type": "token",
                    "index": str(self.targets[i].index),
                    "text": "".join(parts),
                    "attempt": str(self.targets[i].attempt),
                },
            )
            for i, parts in self._pending.items()
        ]
        self._pending.clear()
        self._pending_chars = 0
        self._xadd_many(entries)


def _one(
    template: Any, r: redis.Redis, variant: str, steps: list[Any], rows: int, step_s: float
) -> tuple[float, float]:
    """(thread CPU ms, wall ms) per step spent in the streamer and sink."""
    import torch

    from workers.swift_backend import DeltaStreamer

    targets = [Target(f"stepcost-{i}", 0) for i in range(rows)]
    for t in targets:
        r.xadd(keys.job_events(t.job_id), {"type": "status"}, maxlen=10)
        r.expire(keys.job_events(t.job_id), 300)
    sink = (PipelineSink if variant in ("xadd pipeline", "both, as before") else StreamSink)(r, targets)
    st = DeltaStreamer(template, sink, [], rows)
    if variant in ("per-row decode", "both, as before"):
        st._decode_batch = None
    st.put(torch.zeros(rows, 4, dtype=torch.long))
    cpu = wall = 0.0
    for step in steps:
        time.sleep(step_s)  # the GPU's share of the step
        w, c = time.perf_counter(), time.thread_time()
        st.put(step)
        sink.any_stop()
        cpu += time.thread_time() - c
        wall += time.perf_counter() - w
    st.end()
    return cpu / len(steps) * 1e3, wall / len(steps) * 1e3


def stepcost(rows: int = 32, steps: int = 64, rounds: int = 5, step_ms: float = 21.0) -> dict[str, Any]:
    import torch
    from swift.model import get_processor
    from swift.template import get_template

    template = get_template(
        get_processor(str(bench_model("tiny")), model_type=DEMO_MODEL_TYPE), template_type=DEMO_TEMPLATE
    )
    rng = random.Random(0)
    vocab = template.tokenizer.vocab_size
    ids = [torch.tensor([rng.randrange(3, vocab - 10) for _ in range(rows)]) for _ in range(steps)]
    variants = ["shipped", "per-row decode", "xadd pipeline", "both, as before"]
    sup = Supervisor()
    port = free_port()
    try:
        proc = sup.start(
            "valkey", valkey_argv(port, Path(tempfile.mkdtemp()), appendonly=False), stdout=subprocess.DEVNULL
        )
        wait_for(lambda: port_open(port), 15, "valkey", proc)
        r = redis.Redis(port=port)
        got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for v in variants:
                got[v].append(_one(template, r, v, ids, rows, step_ms / 1e3))
    finally:
        sup.stop_all()
    res: dict[str, Any] = {"rows": rows, "steps": steps, "rounds": rounds, "step_ms": step_ms}
    for v in variants:
        res[v] = {
            "cpu_ms": round(statistics.median(c for c, _ in got[v][1:]), 3),
            "wall_ms": round(statistics.median(w for _, w in got[v][1:]), 3),
        }
    base = res["shipped"]
    print(
        f"token path per step of a {rows}-row batch (medians of {rounds} interleaved rounds, steps "
        f"{step_ms} ms apart): "
        + "; ".join(
            f"{v} {res[v]['cpu_ms']} ms CPU / {res[v]['wall_ms']} ms wall "
            f"(x{res[v]['wall_ms'] / base['wall_ms']:.2f} the shipped wall)"
            for v in variants
        )
    )
    return res
