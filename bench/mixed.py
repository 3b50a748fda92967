"""Real traffic has mixed settings: every client sends its own `max_tokens`, `temperature`,
`top_p`, `stop`. The same stack and the same prompts, uniform settings beside mixed ones,
in one run: (a) a backlog through `/v1/jobs` (occupancy = mean rows per engine call /
MAX_BATCH_SIZE; in continuous mode mean rows per generation step), tokens/s; (b)
closed-loop `/v1/chat/completions` clients (requests/s, tokens/s), for each engine mode;
then (c) the mixed requests through `swift deploy` and through the engine called directly
in full batches with per-row limits (the static upper bound).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from bench._stack import bench_model, bench_settings, stack
from bench.common import prompts
from bench.efficiency import jobs_round
from bench.loadgen import post_many
from cli.processes import free_port
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE

TEMPERATURES = (0.0, 0.7, 1.0)
TOP_PS = (0.9, 1.0)


def mixed_settings(i: int) -> dict[str, Any]:
    """Request i's own settings, deterministic: max_tokens 8-48, three temperatures, two
    top_p, a stop sequence on every fifth."""
    s: dict[str, Any] = {
        "max_tokens": 8 + (i * 13) % 41,
        "temperature": TEMPERATURES[i % 3],
        "top_p": TOP_PS[(i // 3) % 2],
    }
    if i % 5 == 4:
        s["stop"] = ["ab", "\n\n"]
    return s


def uniform_settings(_i: int) -> dict[str, Any]:
    return {"max_tokens": 28, "temperature": 0.7, "top_p": 1.0}


def bodies(n: int, mixed: bool, offset: int = 0) -> list[dict[str, Any]]:
    settings = mixed_settings if mixed else uniform_settings
    return [
        {"model": "tiny", "messages": [{"role": "user", "content": p}], **settings(i)}
        for i, p in enumerate(prompts(n + offset)[offset:])
    ]


def closed_loop(base: str, reqs: list[dict[str, Any]], clients: int) -> dict[str, float]:
    t0 = time.perf_counter()
    out, _lat = asyncio.run(post_many(base, "/v1/chat/completions", reqs, clients))
    wall = time.perf_counter() - t0
    toks = sum(o["usage"]["completion_tokens"] for o in out)
    return {"requests_per_s": len(reqs) / wall, "tokens_per_s": toks / wall}


@contextmanager
def swift_deploy_server(model: Path, batch: int) -> Iterator[str]:
    """`swift deploy` on the model with the transformers backend; yields its base URL."""
    port = free_port()
    log = open(os.devnull, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "swift.cli.deploy",
            "--model",
            str(model),
            "--model_type",
            DEMO_MODEL_TYPE,
            "--template",
            DEMO_TEMPLATE,
            "--infer_backend",
            "transformers",
            "--max_batch_size",
            str(batch),
            "--served_model_name",
            "tiny",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("swift deploy did not start")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def swift_deploy(model: Path, batch: int, reqs: list[dict[str, Any]], clients: int) -> dict[str, float]:
    with swift_deploy_server(model, batch) as base:
        closed_loop(base, reqs[:clients], clients)  # warm-up
        return closed_loop(base, reqs, clients)


def _direct(model: Path, batch: int, reqs: list[dict[str, Any]]) -> dict[str, float]:
    """Our engine in this process, all requests at once: it runs them in full batches of
    `batch` rows, each row with its own settings (the static upper bound)."""
    from schemas.openai import ChatCompletionRequest
    from workers.engines import load_engine
    from workers.runner import gen_requests

    engine = load_engine(bench_settings(model, batch))
    gen = [g for b in reqs for g in gen_requests(ChatCompletionRequest(**b), 512)]
    engine.generate(gen[:batch])  # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(gen)
    wall = time.perf_counter() - t0
    toks = sum(o.completion_tokens for o in outs if not isinstance(o, Exception))
    return {"requests_per_s": len(gen) / wall, "tokens_per_s": toks / wall}


def mixed(
    n: int = 192, batch: int = 16, clients: int = 64, loop_n: int = 256, rounds: int = 5
) -> dict[str, Any]:
    """Medians of `rounds` alternating uniform / mixed rounds on each stack."""
    res: dict[str, Any] = {
        "n": n,
        "max_batch_size": batch,
        "clients": clients,
        "closed_loop_n": loop_n,
        "rounds": rounds,
    }
    for mode in ("static", "continuous"):
        prefix = "" if mode == "static" else "continuous_"
        with stack(INFERQ_MAX_BATCH_SIZE=str(batch), INFERQ_ENGINE_MODE=mode) as (base, _model, env, _sup):
            r = redis.Redis.from_url(env["INFERQ_REDIS_URL"], decode_responses=True)
            closed_loop(base, bodies(clients, True, offset=1000), clients)  # warm-up
            runs: dict[str, list[dict[str, float]]] = {"uniform": [], "mixed": []}
            for i in range(rounds):  # alternating: this VM's speed drifts over tens of seconds
                for kind in ("uniform", "mixed") if i % 2 == 0 else ("mixed", "uniform"):
                    jr = jobs_round(base, r, bodies(n, kind == "mixed"), batch)
                    cl = closed_loop(base, bodies(loop_n, kind == "mixed"), clients)
                    runs[kind].append({**{f"backlog_{k}": v for k, v in jr.items()}, **cl})
                    print(
                        f"  {mode} {kind} round {i + 1}: backlog occupancy {jr['occupancy']:.2f}, "
                        f"{jr['tps']:.0f} tok/s; closed loop {cl['requests_per_s']:.1f} req/s",
                        flush=True,
                    )
            for kind, got in runs.items():

                def med(key: str, got: list[dict[str, float]] = got) -> float:
                    return statistics.median(x[key] for x in got)

                res[f"{prefix}backlog_{kind}_occupancy"] = round(med("backlog_occupancy"), 3)
                res[f"{prefix}backlog_{kind}_tokens_per_s"] = round(med("backlog_tps"), 1)
                res[f"{prefix}closed_loop_{kind}_requests_per_s"] = round(med("requests_per_s"), 1)
                res[f"{prefix}closed_loop_{kind}_tokens_per_s"] = round(med("tokens_per_s"), 1)
    model = bench_model("tiny")
    sd = swift_deploy(model, batch, bodies(loop_n, True), clients)
    res["swift_deploy_mixed_requests_per_s"] = round(sd["requests_per_s"], 1)
    res["swift_deploy_mixed_tokens_per_s"] = round(sd["tokens_per_s"], 1)
    d = _direct(model, batch, bodies(loop_n, True))
    res["direct_mixed_requests_per_s"] = round(d["requests_per_s"], 1)
    res["direct_mixed_tokens_per_s"] = round(d["tokens_per_s"], 1)
    res["occupancy_mixed_over_uniform"] = round(
        res["backlog_mixed_occupancy"] / res["backlog_uniform_occupancy"], 3
    )
    res["closed_loop_mixed_over_uniform"] = round(
        res["closed_loop_mixed_requests_per_s"] / res["closed_loop_uniform_requests_per_s"], 3
    )
    res["closed_loop_mixed_over_swift_deploy"] = round(
        res["closed_loop_mixed_requests_per_s"] / res["swift_deploy_mixed_requests_per_s"], 3
    )
    print(
        f"mixed settings: backlog occupancy {res['backlog_mixed_occupancy']} mixed vs "
        f"{res['backlog_uniform_occupancy']} uniform (x{res['occupancy_mixed_over_uniform']}); closed loop "
        f"{res['closed_loop_mixed_requests_per_s']} vs {res['closed_loop_uniform_requests_per_s']} req/s "
        f"(x{res['closed_loop_mixed_over_uniform']}); swift deploy (mixed) "
        f"{res['swift_deploy_mixed_requests_per_s']} req/s "
        f"(inferq x{res['closed_loop_mixed_over_swift_deploy']}); "
        f"engine direct, per-row limits {res['direct_mixed_requests_per_s']} req/s"
    )
    return res
