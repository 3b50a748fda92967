"""Render docs/benchmarks.md and docs/benchmarks.png from bench/results/*.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _plot(scaling: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [int(k) for k in scaling["tokens_per_s_by_batch"]]
    a.plot(xs, list(scaling["tokens_per_s_by_batch"].values()), marker="o")
    a.set_xscale("log", base=2)
    a.set_xlabel("MAX_BATCH_SIZE")
    a.set_ylabel("completed tokens/s (full path)")
    a.set_title("Throughput vs batch size (1 worker)")
    ws = [int(k) for k in scaling["tokens_per_s_by_workers"]]
    b.bar([str(w) for w in ws], list(scaling["tokens_per_s_by_workers"].values()))
    b.set_xlabel("worker processes (MAX_BATCH_SIZE=8)")
    b.set_title("Throughput vs workers")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _efficiency_rows(eff: dict[str, Any]) -> list[str]:
    med = f", median {eff['median_ratio']}" if "median_ratio" in eff else ""
    bmed = f" (median {eff['median_batch_api_ratio']})" if "median_batch_api_ratio" in eff else ""
    threads = f" (its best: {eff['direct_threads']} torch threads)" if "direct_threads" in eff else ""
    rounds = f", best of {eff['rounds']} interleaved rounds" if "rounds" in eff else ""
    return [
        f"| engine efficiency via `/v1/jobs` with token streaming (n={eff['n']}, max_tokens="
        f"{eff['max_tokens']}, MAX_BATCH_SIZE={eff['max_batch_size']}{rounds}) | "
        f"{eff['queue_tokens_per_s']} tok/s full path | {eff['direct_tokens_per_s']} tok/s "
        f"`TransformersEngine.infer`{threads} | {eff['ratio']} (worker side {eff.get('worker_side_ratio')}"
        f"{med}) | >= 0.95 |",
        f"| engine efficiency, same requests as one `/v1/batches` batch (offline path) | "
        f"{eff['batch_api_tokens_per_s']} tok/s | {eff['direct_tokens_per_s']} tok/s | "
        f"{eff['batch_api_ratio']}{bmed} | >= 0.95 |",
        f"| batch occupancy under backlog | mean batch {eff['mean_batch']} / {eff['max_batch_size']} | "
        f"| {eff['occupancy']} | >= 0.9 |",
    ] + (
        [
            "| CPU seconds per completed token, worker child (`/v1/jobs` rounds, median) | | direct "
            f"engine at the child's thread count | x{eff['cpu_per_token_ratio']} | |"
        ]
        if "cpu_per_token_ratio" in eff
        else []
    )


def render(results: Path, docs: Path) -> None:
    eff, flo, ing, lat, sca = (
        _load(results, n) for n in ("efficiency", "floor", "ingest", "latency", "scaling")
    )
    first = next((x for x in (eff, flo, ing, lat, sca) if x), None)  # the machine of this run
    lines = [
        "# Benchmarks",
        "",
        "Produced by `inferq bench all` then `inferq bench report`; every pair below was",
        "measured side by side in one run. Tiny random Qwen2 demo model (2 layers, hidden 64) on CPU.",
        "",
    ]
    if first:
        m = first["machine"]
        lines += [
            f"Machine: {m['cpu_count']} CPU cores, {m['platform']}, Python {m['python']}, "
            f"torch {m['torch']}, "
            f"GPU: {m['gpu'] or 'none'}. Run at {first['at']}.",
            "",
        ]
    lines += ["| benchmark | inferq | baseline | ratio | goal |", "|---|---|---|---|---|"]
    if eff:
        lines += _efficiency_rows(eff)
    ceil = _load(results, "interference")
    if ceil:
        lines.append(
            f"| the machine's ceiling: `TransformersEngine.infer` alone (no inferq code) while the stack "
            f"beside it takes {ceil['load_jobs_per_s']} jobs/s (echo engine), medians of {ceil['rounds']} "
            f"alternating rounds | {ceil['loaded_tokens_per_s']} tok/s | {ceil['quiet_tokens_per_s']} tok/s "
            f"quiet | {ceil['ceiling']} (CPU per token x{ceil['cpu_per_token_ratio']}) | the full path "
            "cannot beat it |"
        )
    order = _load(results, "ordering")
    if order:
        lines.append(
            f"| batches grouped by prompt length (n={order['n']}, "
            f"MAX_BATCH_SIZE={order['max_batch_size']}, medians of {order['rounds']} alternating rounds) | "
            f"full path {order['jobs_window_4_tokens_per_s']} tok/s with INFERQ_BATCH_LENGTH_WINDOW=4; "
            f"engine alone on sorted requests {order['direct_sorted_tokens_per_s']} tok/s | "
            f"window 1 (arrival order) {order['jobs_window_1_tokens_per_s']} tok/s; engine alone in arrival "
            f"order {order['direct_arrival_tokens_per_s']} tok/s | x{order['jobs_gain']} (engine alone "
            f"x{order['direct_gain']}) | use it if it helps |"
        )
    if flo:
        lines.append(
            f"| queue floor, echo engine (n={flo['n']}) | "
            f"worker side {flo['inferq_worker_jobs_per_s']} jobs/s (backlog queued, then drained); "
            f"end to end through HTTP {flo['inferq_end_to_end_jobs_per_s']} jobs/s | "
            f"{flo['plain_celery_noop_jobs_per_s']} jobs/s plain Celery no-op, drained the same way | "
            f"{flo['ratio_worker']} (end to end {flo['ratio_end_to_end']}) | > 1 |"
        )
    if lat:
        lines.append(
            f"| interactive TTFT under a {lat['batch_lines']}-line batch | "
            f"p50 {lat['backlog_ttft_p50_ms']} ms "
            f"(max {lat['backlog_ttft_max_ms']}) | idle p50 {lat['idle_ttft_p50_ms']} ms | one batch cycle "
            f"≈ {lat['batch_cycle_ms']} ms | within one batch cycle |"
        )
    if ing:
        lines.append(
            f"| API ingest, POST /v1/jobs ({ing['concurrency']} concurrent) | {ing['requests_per_s']} req/s, "
            f"p50 {ing['p50_ms']} ms, p99 {ing['p99_ms']} ms | | | |"
        )
    if sca:
        lines += [
            "",
            "## Scaling",
            "",
            "| MAX_BATCH_SIZE | " + " | ".join(sca["tokens_per_s_by_batch"]) + " |",
            "|---|" + "---|" * len(sca["tokens_per_s_by_batch"]),
            "| tokens/s | " + " | ".join(str(v) for v in sca["tokens_per_s_by_batch"].values()) + " |",
            "",
            "| workers (MAX_BATCH_SIZE=8) | " + " | ".join(sca["tokens_per_s_by_workers"]) + " |",
            "|---|" + "---|" * len(sca["tokens_per_s_by_workers"]),
            "| tokens/s | " + " | ".join(str(v) for v in sca["tokens_per_s_by_workers"].values()) + " |",
            "",
            "![throughput vs batch size and workers](benchmarks.png)",
            "",
        ]
        _plot(sca, docs / "benchmarks.png")
    gpu = _load(results, "efficiency-gpu")
    if gpu:
        m = gpu["machine"]
        lines += [
            "## GPU",
            "",
            f"{m['gpu']}, {m['cpu_count']} CPU cores, torch {m['torch']}, Python {m['python']}; run at "
            f"{gpu['at']}; model: `{gpu.get('model_size', 'tiny')}` demo model (bfloat16).",
            "",
            "| benchmark | inferq | baseline | ratio | goal |",
            "|---|---|---|---|---|",
            *_efficiency_rows(gpu),
            "",
        ]
    notes = results / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    (docs / "benchmarks.md").write_text("\n".join(lines) + "\n")
