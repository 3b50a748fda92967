"""The benchmark suite behind `inferq bench`: every figure is a ratio or a pair measured
side by side in one run on this machine. Results go to bench/results/*.json; `report`
renders docs/benchmarks.md and its plot from them.

    inferq bench all | efficiency | interference | ordering | floor | latency | ingest | scaling
                 | mixed | engines | structured | fleet | report
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
from typing import Any

import httpx
import redis

from bench._stack import QUEUES, ROOT, stack
from bench.chat import chat, cpu
from bench.common import last_finish, post_all, prompts, wait_done
from bench.dashboard import dashboard
from bench.efficiency import efficiency, interference, ordering, queue_tps
from bench.engines import engines
from bench.fleet import fleet
from bench.lora import lora
from bench.mixed import mixed
from bench.stepcost import stepcost
from bench.structured import structured
from bench.timeline import timeline
from cli.processes import Supervisor, free_port, port_open, valkey_argv, wait_for, worker_argv

RESULTS = ROOT / "bench" / "results"


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
        ids, _ = asyncio.run(post_all(base, bodies))
        ours = n / (last_finish(wait_done(r, ids)) - t0)
    with stack(workers=0, INFERQ_ENGINE="echo", INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _m, env, sup):
        r = redis.Redis.from_url(env["INFERQ_REDIS_URL"])
        ids, _ = asyncio.run(post_all(base, bodies))
        sup.start(
            "worker", worker_argv(QUEUES, loglevel="WARNING"), env=env, cwd=ROOT, stdout=subprocess.DEVNULL
        )
        records = wait_done(r, ids)
        started = min(float(rec["started_at"]) for rec in records)
        finished = last_finish(records)
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
        _, lat = asyncio.run(post_all(base, bodies, concurrency))
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
            for i, p in enumerate(prompts(lines))
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
        by_batch[b] = round(queue_tps(n, max_tokens, b)["tps"], 1)
        print(f"scaling: MAX_BATCH_SIZE={b}: {by_batch[b]} tok/s")
    by_workers = {}
    for w in (1, 2):
        by_workers[w] = round(queue_tps(n, max_tokens, 8, workers=w)["tps"], 1)
        print(f"scaling: {w} worker(s), MAX_BATCH_SIZE=8: {by_workers[w]} tok/s")
    return {
        "n": n,
        "max_tokens": max_tokens,
        "tokens_per_s_by_batch": by_batch,
        "tokens_per_s_by_workers": by_workers,
    }


BENCHES: dict[str, Callable[[], dict[str, Any]]] = {
    "efficiency": efficiency,
    "interference": interference,
    "ordering": ordering,
    "floor": floor,
    "ingest": ingest,
    "latency": latency,
    "scaling": scaling,
    "mixed": mixed,
    "engines": engines,
    "chat": chat,
    "cpu": cpu,
    "lora": lora,
    "structured": structured,
    "fleet": fleet,
}
#: run only when named (not by `all`): diagnostics with no figure in the report
DIAGNOSTICS: dict[str, Callable[[], dict[str, Any]]] = {
    "timeline": timeline,
    "stepcost": stepcost,
    "dashboard": dashboard,
}


def _fleet_run(args: argparse.Namespace) -> dict[str, Any]:
    return fleet(
        workers=tuple(int(w) for w in args.workers.split(",")),
        n=args.jobs,
        batch=args.batch,
        batch_api=not args.no_batch_api,
        monitor_n=args.monitor_jobs,
        aof=not args.no_aof,
    )


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
    ap.add_argument("which", nargs="?", default="all", choices=[*BENCHES, *DIAGNOSTICS, "all", "report"])
    ap.add_argument("--size", default="tiny", help="efficiency, timeline: demo model size (tiny, 0.5b)")
    ap.add_argument("--n", type=int, default=256, help="efficiency, timeline: requests")
    ap.add_argument("--max-tokens", type=int, default=32, help="efficiency, timeline")
    ap.add_argument("--batch", type=int, default=8, help="efficiency, timeline, fleet: MAX_BATCH_SIZE")
    ap.add_argument("--rounds", type=int, default=3, help="efficiency, timeline: rounds")
    ap.add_argument("--sizes", default="tiny,small", help="engines: demo model sizes, comma-separated")
    ap.add_argument("--workers", default="1,2,4,8", help="fleet: worker counts, comma-separated")
    ap.add_argument("--jobs", type=int, default=2000, help="fleet: jobs per backlog")
    ap.add_argument("--monitor-jobs", type=int, default=300, help="fleet: jobs of the MONITOR pass (0: none)")
    ap.add_argument("--no-batch-api", action="store_true", help="fleet: /v1/jobs only, no OpenAI batch")
    ap.add_argument("--no-aof", action="store_true", help="fleet: Valkey without its append-only file")
    ap.add_argument("--out", default="", help="results file name (default: the benchmark's name)")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.which == "report":
        from bench.report import render

        render(RESULTS, ROOT / "docs")
        return 0
    names = list(BENCHES) if args.which == "all" else [args.which]
    for name in names:
        run: Callable[[], dict[str, Any]] = {**BENCHES, **DIAGNOSTICS}[name]
        if name in ("efficiency", "timeline"):
            fn = efficiency if name == "efficiency" else timeline
            run = partial(fn, args.n, args.max_tokens, args.batch, args.size, args.rounds)
        if name == "engines":
            run = partial(engines, sizes=tuple(args.sizes.split(",")))
        if name == "fleet":
            run = partial(_fleet_run, args)
        res = {"bench": name, "machine": machine(), "at": time.strftime("%Y-%m-%d %H:%M:%S"), **run()}
        (RESULTS / f"{args.out or name}.json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
