"""Engine efficiency: the same N requests through the full path versus ms-swift's
`TransformersEngine.infer` called directly, side by side.

Why interleaved rounds on one stack: the 2-core VM these numbers were first taken on
wandered by +-15 % over tens of seconds, so measuring one side after the other mostly
measured the machine. Here every round runs the direct engine (in this process, while
the stack idles), then the requests through `/v1/jobs`, then through one `/v1/batches`
batch; each side reports its best round and its median.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench._stack import bench_model, stack
from bench.common import busy_fraction, field_all, last_finish, post_all, prompts, stats, tokens, wait_done
from cli.processes import Supervisor
from core.config import Settings


class Direct:
    """TransformersEngine in this process with the worker's max_batch_size, dtype and
    device. Each round tries torch's default thread count and the worker's (see
    Settings.torch_threads) and keeps the faster: the baseline never runs with a setting
    that suits this machine worse than the worker's."""

    def __init__(self, model: Path, batch: int, max_tokens: int, texts: list[str]) -> None:
        import torch
        from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine

        from workers.engines.swift import _device_map, _dtype

        self.engine = TransformersEngine(
            str(model),
            model_type="qwen2",
            template_type="qwen2_5",
            torch_dtype=_dtype("auto"),
            device_map=_device_map("auto"),
            max_batch_size=batch,
        )
        self.reqs = [InferRequest(messages=[{"role": "user", "content": t}]) for t in texts]
        self.cfg = RequestConfig(max_tokens=max_tokens, temperature=0)
        # warm-up: one full batch, the only batch size this baseline runs
        self.engine.infer(self.reqs[:batch], self.cfg, use_tqdm=False)
        self.default = torch.get_num_threads()
        self.settings = sorted({self.default, Settings().torch_threads or self.default})
        #: CPU seconds per completed token in the last round, by thread count
        self.cpu_per_token: dict[int, float] = {}

    def round(self) -> dict[int, float]:
        import torch

        out: dict[int, float] = {}
        self.cpu_per_token = {}
        for threads in self.settings:
            torch.set_num_threads(threads)
            t0, c0 = time.perf_counter(), time.process_time()
            res = self.engine.infer(self.reqs, self.cfg, use_tqdm=False)
            done = sum(o.usage.completion_tokens for o in res)
            out[threads] = done / (time.perf_counter() - t0)
            self.cpu_per_token[threads] = (time.process_time() - c0) / done
        torch.set_num_threads(self.default)
        return out


def _bodies(texts: list[str], max_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": t}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for t in texts
    ]


def _child_cpu(sup: Supervisor) -> float:
    """CPU seconds of the worker's pool children so far (where the engine runs)."""
    import psutil

    total = 0.0
    for name, proc in sup.procs:
        if name.startswith("worker"):
            for child in psutil.Process(proc.pid).children(recursive=True):
                t = child.cpu_times()
                total += t.user + t.system
    return total


def jobs_round(
    base: str, r: redis.Redis, bodies: list[dict[str, Any]], batch: int, sup: Supervisor | None = None
) -> dict[str, float]:
    """All requests POSTed to /v1/jobs (64 in flight) until every result is in; the clock
    stops at the last job's finish by the worker's clock, not at the polling loop's."""
    cpu0 = _child_cpu(sup) if sup else 0.0
    b0, rows0 = stats(r)
    t0 = time.time()
    ids, _ = asyncio.run(post_all(base, bodies))
    records = wait_done(r, ids)
    b1, rows1 = stats(r)
    first_start = min(float(rec["started_at"]) for rec in records)
    span = last_finish(records) - first_start
    batches = max(b1 - b0, 1)
    return {
        "tps": tokens(records) / (last_finish(records) - t0),
        "child_cpu_per_token": (_child_cpu(sup) - cpu0) / tokens(records) if sup else 0.0,
        "worker_tps": tokens(records) / span,
        "mean_batch": (rows1 - rows0) / batches,
        "occupancy": (rows1 - rows0) / batches / batch,
        "busy": busy_fraction(records),
        "first_start_s": first_start - t0,
    }


def batch_round(c: httpx.Client, r: redis.Redis, texts: list[str], max_tokens: int) -> float:
    """The same requests as one OpenAI batch (the offline path: no token streaming), from
    the upload to the last line's finish."""
    lines = "\n".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        for i, body in enumerate(_bodies(texts, max_tokens))
    )
    t0 = time.time()
    f = c.post("/v1/files", files={"file": ("e.jsonl", lines.encode())}, data={"purpose": "batch"})
    b = c.post(
        "/v1/batches",
        json={
            "input_file_id": f.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    ).json()
    while (b := c.get(f"/v1/batches/{b['id']}").json())["status"] not in ("completed", "failed"):
        time.sleep(0.1)
    done = [float(x) for x in field_all(r, "finished_at") if x and float(x) >= t0]
    return int(b["usage"]["output_tokens"]) / (max(done) - t0)


def queue_tps(n: int, max_tokens: int, batch: int, workers: int = 1, size: str = "tiny") -> dict[str, float]:
    """One round through /v1/jobs on a fresh stack (the scaling table)."""
    with stack(workers=workers, size=size, INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _m, env, _sup):
        return jobs_round(
            base, redis.Redis.from_url(env["INFERQ_REDIS_URL"]), _bodies(prompts(n), max_tokens), batch
        )


def efficiency(
    n: int = 256, max_tokens: int = 32, batch: int = 8, size: str = "tiny", rounds: int = 3
) -> dict[str, Any]:
    texts = prompts(n)
    bodies = _bodies(texts, max_tokens)
    direct_runs: list[dict[int, float]] = []
    jobs_runs: list[dict[str, float]] = []
    batch_runs: list[float] = []
    direct_cpu: list[dict[int, float]] = []
    with (
        stack(size=size, INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, model, env, sup),
        httpx.Client(base_url=base, timeout=120) as c,
    ):
        r = redis.Redis.from_url(env["INFERQ_REDIS_URL"], decode_responses=True)
        direct = Direct(model, batch, max_tokens, texts)
        for i in range(rounds):
            direct_runs.append(direct.round())
            direct_cpu.append(direct.cpu_per_token)
            jobs_runs.append(jobs_round(base, r, bodies, batch, sup))
            batch_runs.append(batch_round(c, r, texts, max_tokens))
            print(
                f"  round {i + 1}: direct {max(direct_runs[-1].values()):.0f} tok/s, /v1/jobs "
                f"{jobs_runs[-1]['tps']:.0f} (occupancy {jobs_runs[-1]['occupancy']:.2f}, engine busy "
                f"{jobs_runs[-1]['busy']:.2f}, first start after {jobs_runs[-1]['first_start_s']:.2f} s), "
                f"/v1/batches {batch_runs[-1]:.0f}",
                flush=True,
            )
    child_threads = Settings().torch_threads or direct.default
    by_threads = {t: max(run[t] for run in direct_runs) for t in direct_runs[0]}
    threads = max(by_threads, key=lambda t: by_threads[t])
    best_direct = by_threads[threads]
    jobs = max(jobs_runs, key=lambda x: x["tps"])
    offline = max(batch_runs)
    med_direct = statistics.median(max(run.values()) for run in direct_runs)
    res = {
        "model_size": size,
        "n": n,
        "max_tokens": max_tokens,
        "max_batch_size": batch,
        "rounds": rounds,
        "queue_tokens_per_s": round(jobs["tps"], 1),
        "worker_side_tokens_per_s": round(jobs["worker_tps"], 1),
        "worker_side_ratio": round(jobs["worker_tps"] / best_direct, 3),
        "batch_api_tokens_per_s": round(offline, 1),
        "batch_api_ratio": round(offline / best_direct, 3),
        "direct_tokens_per_s": round(best_direct, 1),
        "direct_threads": threads,
        "direct_by_threads": {k: round(v, 1) for k, v in by_threads.items()},
        "ratio": round(jobs["tps"] / best_direct, 3),
        "median_ratio": round(statistics.median(x["tps"] for x in jobs_runs) / med_direct, 3),
        "median_batch_api_ratio": round(statistics.median(batch_runs) / med_direct, 3),
        # CPU seconds per completed token: the worker's pool child vs the direct engine at the
        # child's thread count (medians): what the queue costs in compute, whatever the
        # machine's speed of the moment
        "cpu_per_token_ratio": round(
            statistics.median(x["child_cpu_per_token"] for x in jobs_runs)
            / statistics.median(c[child_threads] for c in direct_cpu),
            3,
        ),
        "mean_batch": round(jobs["mean_batch"], 2),
        "occupancy": round(jobs["occupancy"], 3),
    }
    print(
        f"engine efficiency: full path {jobs['tps']:.0f} tok/s vs TransformersEngine.infer "
        f"{best_direct:.0f} tok/s (best with {threads} torch threads) -> ratio {res['ratio']:.3f} "
        f"(median {res['median_ratio']:.3f}, worker side {res['worker_side_ratio']:.3f}); same "
        f"requests as one batch (offline path, no streaming) {offline:.0f} tok/s -> ratio "
        f"{res['batch_api_ratio']:.3f} "
        f"(median {res['median_batch_api_ratio']:.3f}); batch occupancy {res['occupancy']:.2f} "
        f"(mean {res['mean_batch']:.1f}/{batch}); worker child CPU per token x{res['cpu_per_token_ratio']} "
        f"the direct engine's"
    )
    return res


def ordering(n: int = 256, max_tokens: int = 32, batch: int = 8, rounds: int = 6) -> dict[str, Any]:
    """Does grouping by prompt length pay? The engine alone on the same requests in arrival
    order vs sorted by length, and the full path with INFERQ_BATCH_LENGTH_WINDOW=1 (arrival
    order) vs the default 4: two stacks up side by side, rounds alternating between them (this
    VM's speed drifts more between minutes than the effect measured), medians."""
    from contextlib import ExitStack

    texts = prompts(n)
    res: dict[str, Any] = {"n": n, "max_tokens": max_tokens, "max_batch_size": batch, "rounds": rounds}
    model = bench_model("tiny")
    arrival = Direct(model, batch, max_tokens, texts)
    by_len = Direct(model, batch, max_tokens, sorted(texts, key=len))
    a_runs, s_runs = [], []
    for _ in range(rounds):
        a_runs.append(max(arrival.round().values()))
        s_runs.append(max(by_len.round().values()))
    res["direct_arrival_tokens_per_s"] = round(statistics.median(a_runs), 1)
    res["direct_sorted_tokens_per_s"] = round(statistics.median(s_runs), 1)
    res["direct_gain"] = round(statistics.median(s_runs) / statistics.median(a_runs), 3)
    bodies = _bodies(texts, max_tokens)
    runs: dict[int, list[float]] = {1: [], 4: []}
    with ExitStack() as es:
        stacks = {
            w: es.enter_context(stack(INFERQ_MAX_BATCH_SIZE=str(batch), INFERQ_BATCH_LENGTH_WINDOW=str(w)))
            for w in runs
        }
        for i in range(rounds):
            for w in (1, 4) if i % 2 == 0 else (4, 1):
                base, _m, env_, _sup = stacks[w]
                r = redis.Redis.from_url(env_["INFERQ_REDIS_URL"])
                runs[w].append(jobs_round(base, r, bodies, batch)["tps"])
                print(f"  round {i + 1}: window {w}: {runs[w][-1]:.0f} tok/s", flush=True)
    for w, tps in runs.items():
        res[f"jobs_window_{w}_tokens_per_s"] = round(statistics.median(tps), 1)
    res["jobs_gain"] = round(res["jobs_window_4_tokens_per_s"] / res["jobs_window_1_tokens_per_s"], 3)
    print(
        f"ordering by prompt length (medians of {rounds} alternating rounds): engine alone "
        f"{res['direct_sorted_tokens_per_s']} tok/s sorted vs {res['direct_arrival_tokens_per_s']} arrival "
        f"order (x{res['direct_gain']}); full path window 4 {res['jobs_window_4_tokens_per_s']} vs window 1 "
        f"{res['jobs_window_1_tokens_per_s']} tok/s (x{res['jobs_gain']})"
    )
    return res


def interference(n: int = 256, max_tokens: int = 32, batch: int = 8, rounds: int = 6) -> dict[str, Any]:
    """What the rest of the stack costs the engine by merely running beside it on the same
    cores: `TransformersEngine.infer` in this process (no inferq code in its path), quiet vs
    while an echo-engine stack (API, Valkey, Celery parent and child, a load generator) takes
    /v1/jobs requests at the rate this engine completes them. Alternating rounds. On a
    machine where the engine has cores to itself (a GPU, or enough CPU cores) the ratio is
    ~1; below 1 it is a ceiling the full path cannot beat, whatever the queue does."""
    import subprocess
    import sys

    texts = prompts(n)
    quiet: list[float] = []
    loaded: list[float] = []
    quiet_cpu: list[float] = []
    loaded_cpu: list[float] = []
    with stack(INFERQ_ENGINE="echo", INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, model, _env, _sup):
        direct = Direct(model, batch, max_tokens, texts)
        direct.settings = [Settings().torch_threads or direct.default]  # the worker child's thread count
        rate = max(direct.round().values()) / max_tokens  # jobs/s this engine completes
        for i in range(rounds * 2):
            load = i % 2 == 1
            gen = (
                subprocess.Popen(
                    [sys.executable, "-m", "bench.loadgen", base, str(rate), str(max_tokens)],
                    cwd=Path(__file__).resolve().parent.parent,
                )
                if load
                else None
            )
            time.sleep(1.0)  # let the traffic settle
            tps = max(direct.round().values())
            cpu = next(iter(direct.cpu_per_token.values()))
            if gen is not None:
                gen.kill()
                gen.wait()
            (loaded if load else quiet).append(tps)
            (loaded_cpu if load else quiet_cpu).append(cpu)
            print(f"  {'loaded' if load else 'quiet '}: {tps:.0f} tok/s", flush=True)
    res = {
        "n": n,
        "max_tokens": max_tokens,
        "max_batch_size": batch,
        "rounds": rounds,
        "load_jobs_per_s": round(rate, 1),
        "quiet_tokens_per_s": round(statistics.median(quiet), 1),
        "loaded_tokens_per_s": round(statistics.median(loaded), 1),
        "ceiling": round(statistics.median(loaded) / statistics.median(quiet), 3),
        "cpu_per_token_ratio": round(statistics.median(loaded_cpu) / statistics.median(quiet_cpu), 3),
    }
    print(
        f"interference: TransformersEngine.infer alone {res['quiet_tokens_per_s']} tok/s quiet vs "
        f"{res['loaded_tokens_per_s']} while the stack takes {res['load_jobs_per_s']} jobs/s (echo "
        f"engine) -> ceiling {res['ceiling']} (CPU per token x{res['cpu_per_token_ratio']}; medians of "
        f"{rounds} alternating rounds)"
    )
    return res
