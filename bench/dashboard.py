"""`inferq bench dashboard`: the key panels of docs/grafana-dashboard.json, drawn from GET
/metrics scraped every half second while the real stack serves traffic: a backlog of
/v1/jobs with mixed token limits, then closed-loop chat clients on the interactive lane
while the backlog drains. Writes docs/dashboard.png and bench/results/dashboard.json.

The quantiles are Prometheus's `histogram_quantile` (linear within a bucket) over the
increase of each scrape window, as the dashboard's queries compute them."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench._stack import ROOT, stack
from bench.common import prompts
from bench.loadgen import post_many

LANES = ("inferq.interactive@tiny", "inferq.jobs@tiny")  # core.lanes: the bench model's
WINDOW_S = 5.0


def _scrape(base: str) -> dict[str, Any]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    out: dict[str, Any] = {"at": time.time()}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            lane = s.labels.get("lane", "")
            if s.name == "inferq_queue_depth":
                out[f"depth|{lane}"] = s.value
            elif s.name == "inferq_jobs_finished_total":
                out[f"finished|{lane}"] = out.get(f"finished|{lane}", 0.0) + s.value
            elif s.name == "inferq_job_queue_wait_seconds_bucket":
                out[f"wait|{lane}|{s.labels['le']}"] = s.value
            elif s.name in ("inferq_engine_batch_rows_sum", "inferq_engine_batch_rows_count"):
                out[s.name] = s.value
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's estimate from cumulative (upper bound, count) pairs."""
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / max(count - prev_count, 1e-9)
        prev_bound, prev_count = bound, count
    return prev_bound


def _wait_quantile(a: dict[str, Any], b: dict[str, Any], lane: str, q: float) -> float | None:
    pairs = []
    for key, value in b.items():
        if key.startswith(f"wait|{lane}|"):
            le = key.rsplit("|", 1)[1]
            pairs.append((float("inf") if le == "+Inf" else float(le), value - a.get(key, 0.0)))
    return histogram_quantile(q, sorted(pairs)) if pairs else None


def _interactive_clients(base: str, stop: threading.Event, clients: int = 8) -> None:
    texts = prompts(64)

    def loop(i: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            n = i
            while not stop.is_set():
                body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": texts[n % len(texts)]}],
                    "max_tokens": 16,
                    "temperature": 0,
                }
                c.post("/v1/chat/completions", json=body)
                n += clients

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def dashboard(backlog: int = 600, batch: int = 16) -> dict[str, Any]:
    series: list[dict[str, Any]] = []
    with stack(INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, _model, _env, _sup):
        done = threading.Event()

        def scraper() -> None:
            while not done.is_set():
                series.append(_scrape(base))
                time.sleep(0.5)

        t_scrape = threading.Thread(target=scraper, daemon=True)
        t_scrape.start()
        time.sleep(2)
        texts = prompts(backlog)
        bodies = [
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": texts[i]}],
                "max_tokens": 8 + (i * 37) % 57,
                "temperature": 0 if i % 3 else 0.8,
            }
            for i in range(backlog)
        ]
        asyncio.run(post_many(base, "/v1/jobs", bodies, 16))
        time.sleep(3)
        stop = threading.Event()
        chat = threading.Thread(target=_interactive_clients, args=(base, stop), daemon=True)
        chat.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            last = series[-1] if series else {}
            if last.get(f"depth|{LANES[1]}", 1) == 0:
                break
            time.sleep(0.5)
        time.sleep(5)
        stop.set()
        chat.join(timeout=60)
        time.sleep(3)
        done.set()
        t_scrape.join()
    _plot(series, ROOT / "docs" / "dashboard.png")
    first, last = series[0], series[-1]
    finished = {lane: last.get(f"finished|{lane}", 0) - first.get(f"finished|{lane}", 0) for lane in LANES}
    peak = {lane: max(s.get(f"depth|{lane}", 0) for s in series) for lane in LANES}
    return {
        "backlog": backlog,
        "max_batch_size": batch,
        "scrapes": len(series),
        "finished": finished,
        "peak_depth": peak,
    }


def _plot(series: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = series[0]["at"]
    ts = [s["at"] - t0 for s in series]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    ax = axes[0][0]
    for lane in LANES:
        ax.plot(ts, [s.get(f"depth|{lane}", 0) for s in series], label=lane)
    ax.set_title("inferq_queue_depth (jobs waiting, per lane)")
    ax.legend()
    step = max(1, int(WINDOW_S / 0.5))
    pairs = list(zip(series, series[step:], strict=False))
    mid = [(a["at"] + b["at"]) / 2 - t0 for a, b in pairs]
    ax = axes[0][1]
    for lane in LANES:
        rate = [
            (b.get(f"finished|{lane}", 0) - a.get(f"finished|{lane}", 0)) / (b["at"] - a["at"])
            for a, b in pairs
        ]
        ax.plot(mid, rate, label=lane)
    ax.set_title(f"rate(inferq_jobs_finished_total[{WINDOW_S:.0f}s]) (jobs/s)")
    ax.legend()
    ax = axes[1][0]
    for lane in LANES:
        for q, style in ((0.5, "-"), (0.99, "--")):
            vals = [_wait_quantile(a, b, lane, q) for a, b in pairs]
            ax.plot(
                mid,
                [v if v is not None else float("nan") for v in vals],
                style,
                label=f"{lane} p{q * 100:.0f}",
            )
    ax.set_yscale("log")
    ax.set_title("queue wait, histogram_quantile (s)")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    rows = []
    for a, b in pairs:
        calls = b.get("inferq_engine_batch_rows_count", 0) - a.get("inferq_engine_batch_rows_count", 0)
        total = b.get("inferq_engine_batch_rows_sum", 0) - a.get("inferq_engine_batch_rows_sum", 0)
        rows.append(total / calls if calls else float("nan"))
    ax.plot(mid, rows)
    ax.set_title("rows per engine call (inferq_engine_batch_rows)")
    for ax in axes[1]:
        ax.set_xlabel("seconds")
    fig.suptitle(
        "inferq: a 600-job backlog on /v1/jobs, then 8 chat clients on the interactive lane (tiny model, CPU)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
