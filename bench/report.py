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


def _mixed_section(results: Path, docs: Path) -> list[str]:
    """Mixed settings (bench.mixed, before/after) and static vs continuous (bench.engines)."""
    mix, before, eng = (_load(results, n) for n in ("mixed", "mixed-before", "engines"))
    lines: list[str] = []
    if mix:
        lines += [
            "## Mixed settings: every request its own max_tokens, temperature, top_p, stop",
            "",
            f"Tiny model, MAX_BATCH_SIZE={mix['max_batch_size']}; backlog of {mix['n']} `/v1/jobs`; "
            f"{mix['clients']} closed-loop `/v1/chat/completions` clients, {mix['closed_loop_n']} requests; "
            f"medians of {mix.get('rounds', 1)} alternating rounds; run at {mix['at']}. Occupancy: mean rows "
            "per engine call / MAX_BATCH_SIZE (continuous: mean rows per generation step / MAX_BATCH_SIZE).",
            "",
            "| | backlog occupancy | backlog tok/s | closed loop req/s | closed loop tok/s |",
            "|---|---|---|---|---|",
        ]
        runs = [("", mix)] + ([("before this change: ", before)] if before else [])
        for label, r in runs:
            for mode in ("", "continuous_"):
                if f"{mode}backlog_uniform_occupancy" not in r:
                    continue
                name = "continuous" if mode else "static"
                for kind in ("uniform", "mixed"):
                    lines.append(
                        f"| {label}{name}, {kind} | {r[f'{mode}backlog_{kind}_occupancy']} | "
                        f"{r[f'{mode}backlog_{kind}_tokens_per_s']} | "
                        f"{r[f'{mode}closed_loop_{kind}_requests_per_s']} | "
                        f"{r[f'{mode}closed_loop_{kind}_tokens_per_s']} |"
                    )
        lines += [
            f"| `swift deploy --max_batch_size {mix['max_batch_size']}`, mixed | | | "
            f"{mix['swift_deploy_mixed_requests_per_s']} | {mix['swift_deploy_mixed_tokens_per_s']} |",
            f"| engine called directly, full batches with per-row limits, mixed | | | "
            f"{mix['direct_mixed_requests_per_s']} | {mix['direct_mixed_tokens_per_s']} |",
            "",
            f"Goals: mixed occupancy >= 0.9 of uniform: x{mix['occupancy_mixed_over_uniform']}; closed-loop "
            f"mixed req/s >= 0.8 of uniform: x{mix['closed_loop_mixed_over_uniform']}; ahead of `swift "
            f"deploy` on the mixed workload: x{mix['closed_loop_mixed_over_swift_deploy']}.",
            "",
            "![mixed settings](benchmarks-mixed.png)",
            "",
        ]
    if eng:
        lines += [
            "## Static vs continuous batching (engine called directly, greedy)",
            "",
            f"{eng['n']} requests, MAX_BATCH_SIZE={eng['max_batch_size']}; run at {eng['at']}. "
            "`eos-random`: the demo model with its EOS row kept, so outputs end at random points "
            "(1 to 256 tokens).",
            "",
            "| model / output lengths | static tok/s | continuous tok/s | continuous / static |",
            "|---|---|---|---|",
            *[
                f"| {k} | {v['static_tokens_per_s']} | {v['continuous_tokens_per_s']} | "
                f"x{v['continuous_over_static']} |"
                for k, v in eng["runs"].items()
            ],
            "",
        ]
    if mix:
        _plot_mixed(mix, eng, docs / "benchmarks-mixed.png")
    return lines


def _plot_mixed(mix: dict[str, Any], eng: dict[str, Any] | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    labels, values = [], []
    for mode, name in (("", "static"), ("continuous_", "continuous")):
        for kind in ("uniform", "mixed"):
            key = f"{mode}closed_loop_{kind}_requests_per_s"
            if key in mix:
                labels.append(f"{name}\n{kind}")
                values.append(mix[key])
    labels += ["swift deploy\nmixed", "direct\nmixed"]
    values += [mix["swift_deploy_mixed_requests_per_s"], mix["direct_mixed_requests_per_s"]]
    a.bar(
        labels,
        values,
        color=["#4c72b0", "#dd8452", "#4c72b0", "#dd8452", "#999999", "#55a868"][: len(values)],
    )
    a.set_ylabel("requests/s (closed loop, tiny model)")
    a.tick_params(axis="x", labelsize=8)
    a.set_title("Uniform vs mixed settings")
    if eng:
        keys = list(eng["runs"])
        b.barh(keys, [eng["runs"][k]["continuous_over_static"] for k in keys])
        b.axvline(1.0, color="black", linewidth=0.8)
        b.set_xlabel("continuous / static tokens/s (CPU)")
        b.set_title("Static vs continuous batching")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _structured_section(results: Path) -> list[str]:
    """What constrained decoding costs (bench.structured)."""
    st = _load(results, "structured")
    if not st:
        return []
    lines = [
        "## Structured outputs",
        "",
        f"`inferq bench structured`: a backlog of {st['n']} jobs (temperature 0.7, max_tokens "
        f"{st['max_tokens']}, MAX_BATCH_SIZE {st['max_batch_size']}) where every other row carries one "
        f"of three JSON schemas, against the same backlog with none; medians of {st['rounds']} "
        f"alternating rounds, run at {st['at']}.",
        "",
        "| model | stack, structured | stack, plain | ratio | engine direct, ratio "
        "| outputs valid / ended / all |",
        "|---|---|---|---|---|---|",
    ]
    for size in ("tiny", "small"):
        if f"{size}_stack_ratio" not in st:
            continue
        lines.append(
            f"| {size} | {st[f'{size}_stack_structured_tokens_per_s']} tok/s | "
            f"{st[f'{size}_stack_plain_tokens_per_s']} tok/s | x{st[f'{size}_stack_ratio']} | "
            f"x{st[f'{size}_direct_ratio']} ({st[f'{size}_direct_structured_tokens_per_s']} / "
            f"{st[f'{size}_direct_plain_tokens_per_s']} tok/s) | {st[f'{size}_structured_valid']} / "
            f"{st[f'{size}_structured_ended']} / {st[f'{size}_structured_outputs']} |"
        )
    lines += ["", "| vocabulary | CPU per constrained token | compile cold | compile warm | API check |"]
    lines += ["|---|---|---|---|---|"]
    for name in ("demo_vocab", "large_vocab"):
        if (v := st.get(name)) is not None:
            lines.append(
                f"| {v['vocab']} tokens | {v['us_per_constrained_token']} µs | {v['compile_cold_ms']} ms | "
                f"{v['compile_warm_ms']} ms | {v['api_check_ms']} ms |"
            )
    lines += [
        "",
        "Goals: tokens/s ratio >= 0.85 on the small model; every structured output that ended by",
        "itself validates. The large vocabulary is DeepSeek's tokenizer (shipped in litellm); the",
        "cost per token is one row's mask filled, applied to its logits on the CPU and the matcher",
        "stepped. `swift deploy` is not compared: with the transformers backend it has no",
        "constrained decoding.",
        "",
    ]
    return lines


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
    lines += _mixed_section(results, docs)
    lines += _structured_section(results)
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
