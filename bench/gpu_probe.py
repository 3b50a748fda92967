"""Where does a generate step go on the lent GPU? (device, dtype, per-step time)."""

import time

import torch
from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine

from bench._stack import bench_model
from bench.common import prompts as _prompts
from workers.engines.swift import _device_map, _dtype

model = bench_model("0.5b")
for dm in (_device_map("auto"), "cuda:0"):
    e = TransformersEngine(
        str(model),
        model_type="qwen2",
        template_type="qwen2_5",
        torch_dtype=_dtype("auto"),
        device_map=dm,
        max_batch_size=32,
    )
    print("device_map", dm, "->", e.model.device, e.model.dtype, flush=True)
    reqs = [InferRequest(messages=[{"role": "user", "content": p}]) for p in _prompts(32)]
    cfg = RequestConfig(max_tokens=64, temperature=0)
    e.infer(reqs, cfg, use_tqdm=False)
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = e.infer(reqs, cfg, use_tqdm=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tok = sum(o.usage.completion_tokens for o in out)
        print(
            f"  32 reqs: {tok} tokens (longest {max(o.usage.completion_tokens for o in out)})"
            f" in {dt:.2f}s = {tok / dt:.0f} tok/s",
            flush=True,
        )
    del e
    torch.cuda.empty_cache()
