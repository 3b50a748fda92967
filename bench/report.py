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


def render(results: Path, docs: Path) -> None:
    eff, flo, ing, lat, sca = (
        _load(results, n) for n in ("efficiency", "floor", "ingest", "latency", "scaling")
    )
    first = next((x for x in (eff, flo, ing, lat, sca) if x), None)
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
        lines.append(
            f"| engine efficiency (n={eff['n']}, max_tokens={eff['max_tokens']}, MAX_BATCH_SIZE="
            f"{eff['max_batch_size']}) | {eff['queue_tokens_per_s']} tok/s full path | "
            f"{eff['direct_tokens_per_s']} tok/s `TransformersEngine.infer` | {eff['ratio']} (worker side "
            f"{eff.get('worker_side_ratio')}) | >= 0.95 |"
        )
        if "batch_api_ratio" in eff:
            lines.append(
                f"| engine efficiency, same requests as one `/v1/batches` batch (offline path, no token "
                f"streaming) | {eff['batch_api_tokens_per_s']} tok/s | {eff['direct_tokens_per_s']} tok/s "
                f"`TransformersEngine.infer` | {eff['batch_api_ratio']} | >= 0.95 |"
            )
        lines.append(
            f"| batch occupancy under backlog | mean batch {eff['mean_batch']} / {eff['max_batch_size']} | "
            f"| {eff['occupancy']} | >= 0.9 |"
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
    lines += [
        "## Reading these numbers",
        "",
        "- **Engine efficiency is below its 0.95 goal on this machine** (0.4 for /v1/jobs with token",
        "  streaming, 0.57 for the same requests as one batch without streaming). Two CPU cores are",
        "  shared by the API, Valkey, the Celery worker, the load generator and torch (which wants",
        "  both cores),",
        "  while the direct baseline has the machine to itself; token streaming (decode + XADD per",
        "  20 ms) costs about 14 % of engine time in isolation. Batch occupancy is 0.97, so the GPU",
        "  would be fed full batches; the figure that matters, on a GPU, is still to be measured",
        "  (no GPU machine was lent to this task).",
        "- **Queue floor:** with a backlog, one prefork-1 worker completes echo jobs 2.4x faster than",
        "  plain Celery runs no-op tasks, because a worker child claims up to MAX_BATCH_SIZE ready",
        "  jobs per engine call and drains ready batches back to back; each job's own Celery message",
        "  is acknowledged later in about a millisecond. End to end through HTTP the rate is bounded",
        "  by ingest on this box (Python load generator included), about 150 POST/s.",
        "- **Two workers on two cores** oversubscribe torch's threads and are slower than one; run",
        "  one worker per GPU (or per core budget) in production.",
        "",
    ]
    (docs / "benchmarks.md").write_text("\n".join(lines) + "\n")
