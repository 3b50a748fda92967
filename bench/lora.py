"""`inferq bench lora`: what serving many fine-tunes at once costs.

- Throughput of one backlog split evenly across 1, 2, 4 and 8 LoRA adapters against the base
  model alone: the engine called directly (the batching the worker does), same batch size,
  rounds alternating in one run, greedy, every row to its `max_tokens`.
- Time from dropping an adapter into INFERQ_ADAPTERS_DIR to its first served request,
  through the real stack (worker, API), for a few adapters in turn.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench._stack import bench_model, bench_settings, stack
from bench.common import prompts


def _adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def _throughput(size: str, n: int, max_tokens: int, batch: int, rounds: int, root: Path) -> dict[str, Any]:
    from models.spec import resolve_model
    from workers.adapters import scan
    from workers.engine import GenParams, GenRequest
    from workers.engines.swift import SwiftEngine

    model = bench_model(size)
    for i in range(8):
        _adapter(model, root / size / f"a{i}", seed=100 + i)
    engine = SwiftEngine(resolve_model(bench_settings(model, batch)), bench_settings(model, batch))
    engine.sync_adapters(scan(root / size))
    texts = prompts(n)

    def run(k: int) -> float:
        names = [""] * n if k == 0 else [f"a{i % k}" for i in range(n)]
        reqs = [
            GenRequest(
                messages=[{"role": "user", "content": t}],
                params=GenParams(max_tokens=max_tokens, temperature=0),
                adapter=a,
            )
            for t, a in zip(texts, names, strict=True)
        ]
        t0 = time.perf_counter()
        out = engine.generate(reqs)
        wall = time.perf_counter() - t0
        assert all(not isinstance(o, Exception) for o in out), out[:3]
        return n * max_tokens / wall

    run(0)  # warm
    runs: dict[int, list[float]] = {k: [] for k in (0, 1, 2, 4, 8)}
    for _ in range(rounds):
        for k in runs:
            runs[k].append(run(k))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "tokens_per_s": {("base" if k == 0 else f"{k} adapters"): round(v, 1) for k, v in med.items()},
        "over_base": {f"{k} adapters": round(med[k] / med[0], 3) for k in (1, 2, 4, 8)},
        "runs": {str(k): [round(x, 1) for x in v] for k, v in runs.items()},
    }


def _drop_in(root: Path, tries: int = 3) -> dict[str, Any]:
    served = root / "served"
    served.mkdir()
    model = bench_model("tiny")
    sources = [_adapter(model, root / f"src{i}", seed=200 + i) for i in range(tries)]
    waits = []
    with stack(INFERQ_ADAPTERS_DIR=str(served)) as (base, _m, _env, _sup), httpx.Client(base_url=base) as c:
        for i, src in enumerate(sources):
            name = f"new{i}"
            tmp = served / f".{name}"  # copied whole, then renamed: the directory appears at once
            shutil.copytree(src, tmp)
            t0 = time.perf_counter()
            tmp.rename(served / name)
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            while c.post("/v1/chat/completions", json=body, timeout=60).status_code != 200:
                time.sleep(0.05)
            waits.append(time.perf_counter() - t0)
    return {"seconds": [round(w, 2) for w in waits], "median_s": round(statistics.median(waits), 2)}


def lora(n: int = 64, max_tokens: int = 32, batch: int = 16, rounds: int = 2) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="inferq-lora-") as tmp:
        root = Path(tmp)
        return {
            "n": n,
            "max_tokens": max_tokens,
            "max_batch_size": batch,
            "rounds": rounds,
            "tiny": _throughput("tiny", n, max_tokens, batch, rounds, root),
            "small": _throughput("small", n, max_tokens, batch, rounds, root),
            "drop_in_to_first_request": _drop_in(root),
        }
