"""`inferq bench stepcost`: what the token path costs the thread that drives generation, per
step of a 32-row batch, when steps come at a GPU's pace (one decode and one flush per step).

Why it matters: HF `generate` on a GPU is bound by the Python that launches each step, so
every millisecond the streamer and the sink take inside a step is a millisecond the GPU
waits. Measured on an H200 with the 0.5B model: a step takes 21-25 ms. Side by side, interleaved,
on a real Valkey and the demo tokenizer: the shipped path (rows decoded in one call to the
Rust tokenizer, token events handed to a writer thread that sends them in one script
call), the same with the script call made in the generating thread, and the path before
these changes (per-row decoding through transformers, a pipeline of one XADD per job, in
the generating thread). Two figures per step, until every event is written: how long the
generating thread is held up, and the process's CPU on it (writer thread included). The
GPU's loss lies between the two: a writer thread's Python still needs the GIL that the
launching thread holds most of a GPU step.
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
from cli.processes import Supervisor, free_port, port_open, valkey_argv, wait_for
from core import keys
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE
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


VARIANTS = ["shipped", "writes in the generating thread", "before this change"]


def _one(
    template: Any, r: redis.Redis, variant: str, steps: list[Any], rows: int, step_s: float
) -> tuple[float, float]:
    """Per step: (ms the generating thread spends in the token path, ms of CPU of the whole
    process on it, writer thread included), until every token event is written."""
    import torch

    from workers.engines.swift import DeltaStreamer

    targets = [Target(f"stepcost-{i}", 0) for i in range(rows)]
    for t in targets:
        r.xadd(keys.job_events(t.job_id), {"type": "status"}, maxlen=10)
        r.expire(keys.job_events(t.job_id), 300)
        r.hset(keys.job(t.job_id), "attempts", 1)  # the fence xadd_tokens checks
        r.expire(keys.job(t.job_id), 300)
    before = variant == "before this change"
    sink = (PipelineSink if before else StreamSink)(r, targets)
    sink.background = variant == "shipped"
    st = DeltaStreamer(template, sink, [], rows)
    if before:
        st._decode_batch = None
    st.put(torch.zeros(rows, 4, dtype=torch.long))
    blocked = 0.0
    c = time.process_time()
    for step in steps:
        time.sleep(step_s)  # the GPU's share of the step
        w = time.perf_counter()
        st.put(step)
        sink.any_stop()
        blocked += time.perf_counter() - w
    w = time.perf_counter()
    st.end()
    sink.wait_written()
    blocked += time.perf_counter() - w
    cpu = time.process_time() - c
    sink.stop()
    return blocked / len(steps) * 1e3, cpu / len(steps) * 1e3


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
    sup = Supervisor()
    port = free_port()
    try:
        proc = sup.start(
            "valkey", valkey_argv(port, Path(tempfile.mkdtemp()), appendonly=False), stdout=subprocess.DEVNULL
        )
        wait_for(lambda: port_open(port), 15, "valkey", proc)
        r = redis.Redis(port=port)
        got: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for v in VARIANTS:
                got[v].append(_one(template, r, v, ids, rows, step_ms / 1e3))
    finally:
        sup.stop_all()
    res: dict[str, Any] = {"rows": rows, "steps": steps, "rounds": rounds, "step_ms": step_ms}
    for v in VARIANTS:
        res[v] = {
            "blocked_ms": round(statistics.median(b for b, _ in got[v][1:]), 3),
            "cpu_ms": round(statistics.median(c for _, c in got[v][1:]), 3),
        }
    ship = res["shipped"]
    print(
        f"token path per step of a {rows}-row batch, steps {step_ms} ms apart (medians of {rounds} "
        "interleaved rounds), the generating thread held up / the process's CPU (x the shipped): "
        + "; ".join(
            f"{v} {res[v]['blocked_ms']} / {res[v]['cpu_ms']} ms "
            f"(x{res[v]['blocked_ms'] / ship['blocked_ms']:.2f} / x{res[v]['cpu_ms'] / ship['cpu_ms']:.2f})"
            for v in VARIANTS
        )
    )
    return res
