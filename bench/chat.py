"""What the queue costs the engine.

`chat`: 64 closed-loop clients calling `POST /v1/chat/completions` (non-stream, temperature
0, max_tokens 64, prompts of 4-60 words) against inferq (worker, API and Flower), against
`swift deploy` on the same model, and against ms-swift's `TransformersEngine.infer` called
directly with the same batch size; the tiny model (overhead-bound) and the small one
(compute-bound), side by side in one run.

`cpu`: CPU time per completed job of each process of the stack (API, worker parent, worker
child, Valkey, Flower) under the same load, read from /proc, and what the idle stack uses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from bench._stack import bench_model, stack
from bench.mixed import closed_loop, swift_deploy
from core.demo_model import DEMO_MODEL_TYPE, DEMO_TEMPLATE

_WORDS = [
    "the",
    "queue",
    "runs",
    "each",
    "prompt",
    "through",
    "a",
    "warm",
    "engine",
    "and",
    "writes",
    "its",
    "tokens",
    "back",
    "to",
    "redis",
]
_TICK = os.sysconf("SC_CLK_TCK")


def chat_bodies(n: int, max_tokens: int = 64, offset: int = 0) -> list[dict[str, Any]]:
    """Prompts of 4 to 60 words, deterministic; the same settings for every request."""
    out = []
    for i in range(offset, offset + n):
        words = 4 + (i * 37) % 57
        text = " ".join(_WORDS[(i + j) % len(_WORDS)] for j in range(words))
        out.append(
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        )
    return out


def direct_swift(model: Path, batch: int, bodies: list[dict[str, Any]]) -> dict[str, float]:
    """ms-swift's own engine in this process, every request at once in batches of `batch`."""
    from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine

    engine = TransformersEngine(
        str(model), model_type=DEMO_MODEL_TYPE, template_type=DEMO_TEMPLATE, max_batch_size=batch
    )
    reqs = [InferRequest(messages=b["messages"]) for b in bodies]
    cfg = RequestConfig(max_tokens=bodies[0]["max_tokens"], temperature=0)
    engine.infer(reqs[:batch], cfg, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = engine.infer(reqs, cfg, use_tqdm=False)
    wall = time.perf_counter() - t0
    toks = sum(o.usage.completion_tokens for o in outs)
    return {"requests_per_s": len(reqs) / wall, "tokens_per_s": toks / wall}


def chat(
    sizes: tuple[str, ...] = ("tiny", "small"),
    batch: int = 32,
    clients: int = 64,
    n: dict[str, int] | None = None,
) -> dict[str, Any]:
    counts = n or {"tiny": 512, "small": 128}
    res: dict[str, Any] = {"max_batch_size": batch, "clients": clients, "max_tokens": 64, "requests": counts}
    for size in sizes:
        model = bench_model(size)  # EOS-free: every request runs to its 64 tokens on each side
        reqs = chat_bodies(counts[size])
        with stack(size=size, flower=True, INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _m, _env, _sup):
            closed_loop(base, chat_bodies(clients, offset=10_000), clients)  # warm-up
            iq = closed_loop(base, reqs, clients)
        sd = swift_deploy(model, batch, reqs, clients)
        d = direct_swift(model, batch, reqs)
        row = {
            "inferq_requests_per_s": round(iq["requests_per_s"], 2),
            "swift_deploy_requests_per_s": round(sd["requests_per_s"], 2),
            "direct_requests_per_s": round(d["requests_per_s"], 2),
            "inferq_over_direct": round(iq["requests_per_s"] / d["requests_per_s"], 3),
            "swift_deploy_over_direct": round(sd["requests_per_s"] / d["requests_per_s"], 3),
            "inferq_over_swift_deploy": round(iq["requests_per_s"] / sd["requests_per_s"], 3),
        }
        res[size] = row
        print(
            f"chat {size}: inferq {row['inferq_requests_per_s']} req/s "
            f"(x{row['inferq_over_direct']} of direct), "
            f"swift deploy {row['swift_deploy_requests_per_s']} (x{row['swift_deploy_over_direct']}), "
            f"direct {row['direct_requests_per_s']}",
            flush=True,
        )
    return res


def cpu_s(pid: int) -> float:
    """utime + stime of one process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def _snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_s(p) for p in ps) for name, ps in pids.items()}


def cpu(n: int = 512, clients: int = 64, batch: int = 32, idle_s: float = 30.0) -> dict[str, Any]:
    with stack(flower=True, INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _m, _env, sup):
        by_name = {name: proc.pid for name, proc in sup.procs}
        parent = by_name["worker0"]
        pids = {
            "api": [by_name["api"], *children(by_name["api"])],
            "worker_parent": [parent],
            "worker_child": children(parent),
            "valkey": [by_name["valkey"]],
            "flower": [by_name["flower"]],
        }
        closed_loop(base, chat_bodies(clients, offset=10_000), clients)  # warm-up
        time.sleep(5)  # let the warm-up's last acknowledgements and Flower's refresh settle
        before = _snapshot(pids)
        time.sleep(idle_s)  # the idle stack: what it burns doing nothing
        idle = {k: (v - before[k]) / idle_s * 100 for k, v in _snapshot(pids).items()}
        before = _snapshot(pids)
        closed_loop(base, chat_bodies(n), clients)
        per_job = {k: (v - before[k]) * 1000 / n for k, v in _snapshot(pids).items()}
    outside = sum(v for k, v in per_job.items() if k != "worker_child")
    res = {
        "n": n,
        "clients": clients,
        "max_batch_size": batch,
        "cpu_ms_per_job": {k: round(v, 2) for k, v in per_job.items()},
        "cpu_ms_per_job_outside_engine": round(outside, 2),
        "idle_percent_of_a_core": {k: round(v, 3) for k, v in idle.items()},
        "idle_percent_total": round(sum(idle.values()), 3),
    }
    print(
        f"cpu per job (ms): {res['cpu_ms_per_job']}; "
        f"outside the engine child {res['cpu_ms_per_job_outside_engine']}"
        f"; idle stack {res['idle_percent_total']} % of a core {res['idle_percent_of_a_core']}",
        flush=True,
    )
    return res
