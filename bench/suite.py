"""The benchmark suite behind `inferq bench`: every figure is a ratio or a pair measured
side by side in one run on this machine. Results go to bench/results/*.json; `report`
renders docs/benchmarks.md and its plot from them.

    inferq bench all | efficiency | floor | latency | ingest | scaling | report
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import httpx
import redis

from bench._stack import QUEUES, ROOT, stack
from bench.loadgen import post_many
from core import keys
from core.processes import Supervisor, free_port, port_open, valkey_argv, wait_for, worker_argv

RESULTS = ROOT / "bench" / "results"


def _prompts(n: int) -> list[str]:
    """Mixed prompt lengths, deterministic."""
    return [f"request {i}: " + " ".join(["tell me about gpus"] * (1 + (i * 7) % 13)) for i in range(n)]


async def _post_all(
    base: str, bodies: list[dict[str, Any]], concurrency: int = 64
) -> tuple[list[str], list[float]]:
    out, lat = await post_many(base, "/v1/jobs", bodies, concurrency)
    return [o["id"] for o in out], lat


def _wait_done(r: redis.Redis, ids: list[str], timeout: float = 1800) -> list[dict[str, str]]:
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


def _last_finish(records: list[dict[str, str]]) -> float:
    """When the last job finished, by the worker's clock (same machine): the waiting loop's
    polling interval does not enter the figure."""
    return max(float(rec["finished_at"]) for rec in records)


def _tokens(records: list[dict[str, str]]) -> int:
    return sum(
        json.loads(rec["result"])["usage"]["completion_tokens"] for rec in records if rec.get("result")
    )


def _stats(r: redis.Redis) -> tuple[int, int]:
    raw = r.hgetall(keys.stats())
    return int(raw.get(b"batches", 0)), int(raw.get(b"batch_rows", 0))


def _direct_tps(
    model: Path, prompts: list[str], max_tokens: int, batch: int, rounds: int = 2
) -> dict[str, Any]:
    """ms-swift's TransformersEngine.infer in this process, same max_batch_size, dtype and
    device as the worker. The baseline is the best round over torch's default thread count
    and the worker's (see Settings.torch_threads): the ratio is never flattered by a
    baseline run with a setting that suits this machine worse."""
    import torch
    from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine

    from workers.swift_backend import _device_map, _dtype, cpu_threads

    engine = TransformersEngine(
        str(model),
        model_type="qwen2",
        template_type="qwen2_5",
        torch_dtype=_dtype("auto"),
        device_map=_device_map("auto"),
        max_batch_size=batch,
    )
    reqs = [InferRequest(messages=[{"role": "user", "content": p}]) for p in prompts]
    cfg = RequestConfig(max_tokens=max_tokens, temperature=0)
    engine.infer(reqs[:batch], cfg, use_tqdm=False)  # warm-up, as our worker does
    default = torch.get_num_threads()
    by_threads: dict[int, float] = {}
    for threads in sorted({default, cpu_threads(0) or default}):
        torch.set_num_threads(threads)
        for _ in range(rounds):
            t0 = time.perf_counter()
            out = engine.infer(reqs, cfg, use_tqdm=False)
            tps = sum(o.usage.completion_tokens for o in out) / (time.perf_counter() - t0)
            by_threads[threads] = max(by_threads.get(threads, 0.0), tps)
    torch.set_num_threads(default)
    best = max(by_threads, key=lambda t: by_threads[t])
    return {"tps": by_threads[best], "threads": best, "by_threads": by_threads}


def _queue_tps(
    n: int, max_tokens: int, batch: int, workers: int = 1, size: str = "tiny", rounds: int = 1
) -> dict[str, Any]:
    """The same requests through the full path, `rounds` times on one stack; the best round."""
    prompts = _prompts(n)
    env = {"INFERQ_MAX_BATCH_SIZE": str(batch)}
    bodies = [
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": p}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for p in prompts
    ]
    best: dict[str, Any] = {}
    with stack(workers=workers, size=size, **env) as (base, model, env_, _sup):
        r = redis.Redis.from_url(env_["INFERQ_REDIS_URL"])
        for _ in range(rounds):
            b0, rows0 = _stats(r)
            t0 = time.time()
            ids, _ = asyncio.run(_post_all(base, bodies))
            records = _wait_done(r, ids)
            elapsed = _last_finish(records) - t0
            b1, rows1 = _stats(r)
            batches = max(b1 - b0, 1)
            span = _last_finish(records) - min(float(rec["started_at"]) for rec in records)
            res = {
                "tps": _tokens(records) / elapsed,
                "worker_tps": _tokens(records) / span,
                "elapsed_s": elapsed,
                "model": model,
                "mean_batch": (rows1 - rows0) / batches,
                "occupancy": (rows1 - rows0) / batches / batch,
            }
            if res["tps"] > best.get("tps", 0.0):
                best = res
    return best


def _batch_tps(n: int, max_tokens: int, batch: int, size: str = "tiny", rounds: int = 1) -> float:
    """The same requests as one OpenAI batch (the offline path: no token streaming), `rounds`
    batches one after the other on one stack; the best."""
    lines = "\n".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "tiny",
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": p}],
                },
            }
        )
        for i, p in enumerate(_prompts(n))
    )
    best = 0.0
    with (
        stack(size=size, INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _m, env, _sup),
        httpx.Client(base_url=base, timeout=120) as c,
    ):
        r = redis.Redis.from_url(env["INFERQ_REDIS_URL"], decode_responses=True)
        for _ in range(rounds):
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
            # the last line's finish by the worker's clock, not the polling loop's
            done = [float(x) for x in _field_all(r, "finished_at") if x and float(x) >= t0]
            best = max(best, int(b["usage"]["output_tokens"]) / (max(done) - t0))
    return best


def _field_all(r: redis.Redis, field: str) -> list[str]:
    """One field of every job record on this (benchmark-only) server."""
    names = list(r.scan_iter(match=keys.job("*"), count=1000))
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.hget(name, field)
    return cast(list[str], pipe.execute())


def efficiency(
    n: int = 256, max_tokens: int = 32, batch: int = 8, size: str = "tiny", rounds: int = 3
) -> dict[str, Any]:
    """Each side's best of `rounds` (this VM's timings wander by +-15 % run to run); the
    direct side also takes the better of two thread settings (see _direct_tps)."""
    q = _queue_tps(n, max_tokens, batch, size=size, rounds=rounds)
    offline = _batch_tps(n, max_tokens, batch, size=size, rounds=rounds)
    d = _direct_tps(q["model"], _prompts(n), max_tokens, batch, rounds=rounds)
    direct = d["tps"]
    res = {
        "model_size": size,
        "n": n,
        "max_tokens": max_tokens,
        "max_batch_size": batch,
        "rounds": rounds,
        "queue_tokens_per_s": round(q["tps"], 1),
        "worker_side_tokens_per_s": round(q["worker_tps"], 1),
        "worker_side_ratio": round(q["worker_tps"] / direct, 3),
        "batch_api_tokens_per_s": round(offline, 1),
        "batch_api_ratio": round(offline / direct, 3),
        "direct_tokens_per_s": round(direct, 1),
        "direct_threads": d["threads"],
        "direct_by_threads": {k: round(v, 1) for k, v in d["by_threads"].items()},
        "ratio": round(q["tps"] / direct, 3),
        "mean_batch": round(q["mean_batch"], 2),
        "occupancy": round(q["occupancy"], 3),
    }
    print(
        f"engine efficiency: full path {q['tps']:.0f} tok/s vs TransformersEngine.infer {direct:.0f} tok/s "
        f"(best with {d['threads']} torch threads) -> ratio {res['ratio']:.3f} (worker side "
        f"{res['worker_side_ratio']:.3f}); same requests as one batch (offline path, no streaming) "
        f"{offline:.0f} tok/s -> ratio {res['batch_api_ratio']:.3f}; batch occupancy "
        f"{res['occupancy']:.2f} (mean {res['mean_batch']:.1f}/{batch})"
    )
    return res


def _plain_celery(n: int) -> float:
    """Plain Celery no-op tasks drained by a prefork-1 worker: n messages are queued first,
    then the worker is started; jobs/s from the first task run to the last."""
    sup = Supervisor()
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"inferq-noop-{os.getpid()}"
    port = free_port()
    try:
        proc = sup.start("valkey", valkey_argv(port, home, appendonly=False), stdout=subprocess.DEVNULL)
        wait_for(lambda: port_open(port), 15, "valkey", proc)
        url = f"redis://127.0.0.1:{port}/0"
        os.environ["INFERQ_REDIS_URL"] = url
        from bench import noop_celery

        noop_celery.app.conf.broker_url = url
        r = redis.Redis.from_url(url)
        with noop_celery.app.producer_or_acquire() as producer:
            for _ in range(n):
                noop_celery.app.send_task("bench.noop", producer=producer)
        sup.start(
            "noop-worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.noop_celery",
                "worker",
                "-P",
                "prefork",
                "-c",
                "1",
                "--loglevel",
                "WARNING",
                "--without-mingle",
                "--without-gossip",
            ],
            env={**os.environ, "INFERQ_REDIS_URL": url},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        while int(r.get("inferq:bench:noop") or 0) < 1:
            time.sleep(0.001)
        t0 = time.perf_counter()
        while int(r.get("inferq:bench:noop") or 0) < n:
            time.sleep(0.005)
        return (n - 1) / (time.perf_counter() - t0)
    finally:
        sup.stop_all()


def floor(n: int = 3000, batch: int = 32) -> dict[str, Any]:
    """Echo engine. Worker side: n jobs queued through the API first, then one worker
    started; jobs/s from the first job started to the last finished, beside plain Celery's
    no-op drain measured the same way. End to end: n concurrent POST /v1/jobs until all
    results are in (bounded by HTTP ingest on this 2-core box, load generator included)."""
    bodies = [
        {"model": "tiny", "messages": [{"role": "user", "content": f"echo {i}"}], "max_tokens": 4}
        for i in range(n)
    ]
    with stack(INFERQ_ENGINE="echo", INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _m, env, _sup):
        r = redis.Redis.from_url(env["INFERQ_REDIS_URL"])
        t0 = time.time()
        ids, _ = asyncio.run(_post_all(base, bodies))
        ours = n / (_last_finish(_wait_done(r, ids)) - t0)
    with stack(workers=0, INFERQ_ENGINE="echo", INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _m, env, sup):
        r = redis.Redis.from_url(env["INFERQ_REDIS_URL"])
        ids, _ = asyncio.run(_post_all(base, bodies))
        sup.start(
            "worker", worker_argv(QUEUES, loglevel="WARNING"), env=env, cwd=ROOT, stdout=subprocess.DEVNULL
        )
        records = _wait_done(r, ids)
        started = min(float(rec["started_at"]) for rec in records)
        finished = _last_finish(records)
        drain = n / (finished - started)
    plain = _plain_celery(n)
    res = {
        "n": n,
        "inferq_end_to_end_jobs_per_s": round(ours, 1),
        "inferq_worker_jobs_per_s": round(drain, 1),
        "plain_celery_noop_jobs_per_s": round(plain, 1),
        "ratio_end_to_end": round(ours / plain, 2),
        "ratio_worker": round(drain / plain, 2),
    }
    print(
        f"queue floor: inferq worker side {drain:.0f} jobs/s vs plain Celery no-op {plain:.0f} jobs/s "
        f"-> ratio {res['ratio_worker']:.2f}; end to end through HTTP {ours:.0f} jobs/s "
        f"(ratio {res['ratio_end_to_end']:.2f})"
    )
    return res


def ingest(n: int = 2000, concurrency: int = 64) -> dict[str, Any]:
    with stack(INFERQ_ENGINE="echo", INFERQ_MAX_BATCH_SIZE="32") as (base, _m, _env, _sup):
        bodies = [
            {"model": "tiny", "messages": [{"role": "user", "content": f"ingest {i}"}]} for i in range(n)
        ]
        t0 = time.perf_counter()
        _, lat = asyncio.run(_post_all(base, bodies, concurrency))
        rps = n / (time.perf_counter() - t0)
    lat_ms = sorted(x * 1000 for x in lat)
    res = {
        "n": n,
        "concurrency": concurrency,
        "requests_per_s": round(rps, 1),
        "p50_ms": round(lat_ms[len(lat_ms) // 2], 1),
        "p99_ms": round(lat_ms[int(len(lat_ms) * 0.99)], 1),
    }
    print(
        f"API ingest: {rps:.0f} POST /v1/jobs per s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms "
        f"({n} requests, {concurrency} concurrent)"
    )
    return res


def _ttft(client: httpx.Client, n: int) -> list[float]:
    out = []
    for i in range(n):
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"interactive {i}"}],
            "max_tokens": 8,
            "stream": True,
        }
        t0 = time.perf_counter()
        got = False
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if not got and line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        out.append((time.perf_counter() - t0) * 1000)
                        got = True
    return out


def latency(lines: int = 3000, batch: int = 8, n: int = 10) -> dict[str, Any]:
    with (
        stack(INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _m, _env, _sup),
        httpx.Client(base_url=base, timeout=120) as c,
    ):
        idle = _ttft(c, n)
        data = "\n".join(
            json.dumps(
                {
                    "custom_id": f"b{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "tiny", "max_tokens": 32, "messages": [{"role": "user", "content": p}]},
                }
            )
            for i, p in enumerate(_prompts(lines))
        ).encode()
        f = c.post("/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"}).json()
        b = c.post(
            "/v1/batches",
            json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ).json()
        while c.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"] < batch * 2:
            time.sleep(0.1)
        t_cycle0 = time.perf_counter()
        done0 = c.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"]
        busy = _ttft(c, n)
        cycle_s = (time.perf_counter() - t_cycle0) / max(
            (c.get(f"/v1/batches/{b['id']}").json()["request_counts"]["completed"] - done0) / batch, 1
        )
        c.post(f"/v1/batches/{b['id']}/cancel")
    res = {
        "idle_ttft_p50_ms": round(statistics.median(idle), 1),
        "backlog_ttft_p50_ms": round(statistics.median(busy), 1),
        "backlog_ttft_max_ms": round(max(busy), 1),
        "batch_cycle_ms": round(cycle_s * 1000, 1),
        "batch_lines": lines,
        "max_batch_size": batch,
    }
    print(
        f"interactive TTFT: idle p50 {res['idle_ttft_p50_ms']} ms vs under a {lines}-line batch backlog p50 "
        f"{res['backlog_ttft_p50_ms']} ms (max {res['backlog_ttft_max_ms']} ms; one batch cycle "
        f"~{res['batch_cycle_ms']} ms)"
    )
    return res


def scaling(n: int = 192, max_tokens: int = 32) -> dict[str, Any]:
    by_batch = {}
    for b in (1, 2, 4, 8, 16, 32):
        by_batch[b] = round(_queue_tps(n, max_tokens, b)["tps"], 1)
        print(f"scaling: MAX_BATCH_SIZE={b}: {by_batch[b]} tok/s")
    by_workers = {}
    for w in (1, 2):
        by_workers[w] = round(_queue_tps(n, max_tokens, 8, workers=w)["tps"], 1)
        print(f"scaling: {w} worker(s), MAX_BATCH_SIZE=8: {by_workers[w]} tok/s")
    return {
        "n": n,
        "max_tokens": max_tokens,
        "tokens_per_s_by_batch": by_batch,
        "tokens_per_s_by_workers": by_workers,
    }


BENCHES: dict[str, Callable[[], dict[str, Any]]] = {
    "efficiency": efficiency,
    "floor": floor,
    "ingest": ingest,
    "latency": latency,
    "scaling": scaling,
}


def machine() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": gpu,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="inferq bench")
    ap.add_argument("which", nargs="?", default="all", choices=[*BENCHES, "all", "report"])
    ap.add_argument("--size", default="tiny", help="efficiency only: demo model size (tiny, 0.5b)")
    ap.add_argument("--n", type=int, default=256, help="efficiency only: requests")
    ap.add_argument("--max-tokens", type=int, default=32, help="efficiency only")
    ap.add_argument("--batch", type=int, default=8, help="efficiency only: MAX_BATCH_SIZE")
    ap.add_argument("--rounds", type=int, default=3, help="efficiency only: best of this many")
    ap.add_argument("--out", default="", help="results file name (default: the benchmark's name)")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.which == "report":
        from bench.report import render

        render(RESULTS, ROOT / "docs")
        return 0
    names = list(BENCHES) if args.which == "all" else [args.which]
    for name in names:
        run: Callable[[], dict[str, Any]] = BENCHES[name]
        if name == "efficiency":
            run = partial(efficiency, args.n, args.max_tokens, args.batch, args.size, args.rounds)
        res = {"bench": name, "machine": machine(), "at": time.strftime("%Y-%m-%d %H:%M:%S"), **run()}
        (RESULTS / f"{args.out or name}.json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
