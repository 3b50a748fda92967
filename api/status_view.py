"""What GET /metrics and GET /status show: the job store's metrics (core.metrics), the live
workers' heartbeats and the latest failures, read in one round trip per request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from api import webhooks
from core import keys, lanes, metrics

STATUSES = ("succeeded", "failed", "cancelled", "expired")
_HISTOGRAMS = {
    "queue_wait": ("inferq_job_queue_wait_seconds", "Time from submission to a worker starting the job."),
    "run": ("inferq_job_run_seconds", "Time from a worker starting the job to its end."),
    "ttft": ("inferq_time_to_first_token_seconds", "Time from submission to the first generated token."),
}


@dataclass
class SystemView:
    snapshot: metrics.Snapshot
    workers: list[dict[str, Any]]
    failures: list[dict[str, Any]]


async def live_workers(client: aredis.Redis) -> list[dict[str, Any]]:
    """The workers whose heartbeat stands (the index may name some that just died)."""
    ids = cast(list[str], await client.zrange(keys.WORKERS, 0, -1))
    if not ids:
        return []
    raws = await client.mget([keys.worker(i) for i in ids])
    if gone := [i for i, raw in zip(ids, raws, strict=True) if not raw]:
        await client.zrem(keys.WORKERS, *gone)
    return [json.loads(raw) for raw in raws if raw]


async def read(client: aredis.Redis, own_lanes: list[str]) -> SystemView:
    """`own_lanes` (this API's model's) and every live worker's show, at 0 where nothing
    happened."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.METRICS)
        pipe.lrange(keys.FAILURES, 0, 9)
        raw, failures = await pipe.execute()
    workers = await live_workers(client)
    known = list(dict.fromkeys([*own_lanes, *(lane for w in workers for lane in w.get("lanes") or [])]))
    return SystemView(
        snapshot=metrics.decode(raw, known),
        workers=workers,
        failures=[_failure(json.loads(f)) for f in failures],
    )


def _failure(entry: dict[str, Any]) -> dict[str, Any]:
    error = json.loads(entry["error"]) if entry.get("error") else {}
    return {"job_id": entry.get("job_id"), "at": entry.get("at"), "lane": entry.get("lane"), **error}


def families(view: SystemView) -> list[Metric]:
    snap = view.snapshot
    return [
        *_job_families(snap),
        *_token_families(snap),
        *_histogram_families(snap),
        *_hook_families(snap),
        *webhooks.families(snap),
        *_worker_families(view.workers),
    ]


def _labels(lane: str) -> list[str]:
    """A lane's labels: the queue (`inferq.jobs`) and the model (core.lanes), so that a
    scaler (KEDA) can follow each model's depth on its own."""
    return list(lanes.parts(lane))


def _job_families(snap: metrics.Snapshot) -> list[Metric]:
    """Queue depth and finished jobs per lane: every known lane shows every status, at 0 too."""
    depth = GaugeMetricFamily(
        "inferq_queue_depth", "Jobs queued and not started, per lane and model.", labels=["lane", "model"]
    )
    for lane, n in snap.depth.items():
        depth.add_metric(_labels(lane), n)
    finished = CounterMetricFamily(
        "inferq_jobs_finished",
        "Jobs that ended, by lane, model and status.",
        labels=["lane", "model", "status"],
    )
    for lane in snap.depth:
        for status in STATUSES:
            finished.add_metric([*_labels(lane), status], snap.finished.get((lane, status), 0))
    for (lane, status), n in snap.finished.items():
        if lane not in snap.depth:
            finished.add_metric([*_labels(lane), status], n)
    return [depth, finished]


def _token_families(snap: metrics.Snapshot) -> list[Metric]:
    """Prompt and generated tokens per lane, finished jobs per model."""
    prompt = CounterMetricFamily(
        "inferq_prompt_tokens", "Prompt tokens of finished jobs.", labels=["lane", "model"]
    )
    generated = CounterMetricFamily(
        "inferq_generated_tokens", "Tokens generated for finished jobs.", labels=["lane", "model"]
    )
    for lane, n in snap.prompt_tokens.items():
        prompt.add_metric(_labels(lane), n)
    for lane, n in snap.generated_tokens.items():
        generated.add_metric(_labels(lane), n)
    model_jobs = CounterMetricFamily(
        "inferq_model_jobs",
        "Finished jobs per model (the base model and each LoRA adapter).",
        labels=["model"],
    )
    for model, n in snap.model_jobs.items():
        model_jobs.add_metric([model], n)
    return [prompt, generated, model_jobs]


def _histogram_families(snap: metrics.Snapshot) -> list[Metric]:
    """The per-lane latency histograms, then the engine's rows per call."""
    out: list[Metric] = []
    for name, (metric, doc) in _HISTOGRAMS.items():
        family = HistogramMetricFamily(metric, doc, labels=["lane", "model"])
        for (hname, lane), h in sorted(snap.histograms.items()):
            if hname == name:
                family.add_metric(_labels(lane), h.cumulative(), h.total)
        out.append(family)
    rows = snap.histograms[("batch_rows", "")]
    batch = HistogramMetricFamily("inferq_engine_batch_rows", "Rows (requests) per engine call.")
    batch.add_metric([], rows.cumulative(), rows.total)
    out.append(batch)
    return out


def _hook_families(snap: metrics.Snapshot) -> list[Metric]:
    """Time in hooks (models.hooks) by stage and hook, and the hooks that refused or failed."""
    seconds = HistogramMetricFamily(
        "inferq_hook_seconds",
        "Time one hook took, by stage (before: in the API, after: in the worker).",
        labels=["stage", "hook"],
    )
    for (name, label), h in sorted(snap.histograms.items()):
        if name == "hook":
            stage, _, hook = label.partition("|")
            seconds.add_metric([stage, hook], h.cumulative(), h.total)
    outcomes = CounterMetricFamily(
        "inferq_hook_outcomes",
        "Hook runs that refused or failed, by stage and hook.",
        labels=["stage", "hook", "outcome"],
    )
    for (stage, hook, outcome), n in sorted(snap.hook_outcomes.items()):
        outcomes.add_metric([stage, hook, outcome], n)
    return [seconds, outcomes]


def _worker_families(live: list[dict[str, Any]]) -> list[Metric]:
    """From the live workers' heartbeats: how many per model, and each one's gauges."""
    workers = GaugeMetricFamily(
        "inferq_workers", "Live workers (heartbeat standing), per model.", labels=["model"]
    )
    by_model: dict[str, int] = {}
    for w in live:
        by_model[w.get("model", "")] = by_model.get(w.get("model", ""), 0) + 1
    for model, n in by_model.items():
        workers.add_metric([model], n)
    busy = GaugeMetricFamily(
        "inferq_worker_busy_ratio", "Share of time in tasks since the previous heartbeat.", labels=["worker"]
    )
    gpu = GaugeMetricFamily(
        "inferq_gpu_memory_bytes", "GPU memory torch holds, per worker.", labels=["worker"]
    )
    loads = CounterMetricFamily(
        "inferq_adapter_loads", "LoRA adapters loaded, per worker.", labels=["worker"]
    )
    unloads = CounterMetricFamily(
        "inferq_adapter_unloads", "LoRA adapters unloaded, per worker.", labels=["worker"]
    )
    for w in live:
        if "adapter_loads" in w:
            loads.add_metric([w["worker_id"]], w["adapter_loads"])
            unloads.add_metric([w["worker_id"]], w["adapter_unloads"])
    for w in live:
        busy.add_metric([w["worker_id"]], float(w.get("busy_ratio") or 0.0))
        if w.get("gpu_memory_bytes") is not None:
            gpu.add_metric([w["worker_id"]], float(w["gpu_memory_bytes"]))
    return [workers, busy, gpu, loads, unloads]


class _Fixed(Collector):
    def __init__(self, items: list[Metric]) -> None:
        self.items = items

    def collect(self) -> list[Metric]:
        return self.items


def render(view: SystemView, http: CollectorRegistry) -> bytes:
    """The system's families, then the API process's own (HTTP requests, process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families(view)))
    return generate_latest(registry) + generate_latest(http)


def _seconds(h: metrics.Histogram, q: float) -> float | None:
    value = h.quantile(q)
    return None if value is None or value == float("inf") else value


def status(view: SystemView) -> dict[str, Any]:
    """`inferq status --json` and `inferq top`: the same numbers as /metrics, per lane and
    per worker. Quantiles are estimates interpolated within histogram buckets (as
    Prometheus' histogram_quantile); `tokens_per_s` is the worker's own rate over its last
    heartbeat interval (tasks.child), live while a long job runs."""
    snap = view.snapshot
    lanes = {}
    for lane, depth in snap.depth.items():
        wait, run = snap.histograms[("queue_wait", lane)], snap.histograms[("run", lane)]
        lanes[lane] = {
            "depth": depth,
            "finished": {s: snap.finished.get((lane, s), 0) for s in STATUSES},
            "wait_p50_s": _seconds(wait, 0.5),
            "wait_p99_s": _seconds(wait, 0.99),
            "run_p50_s": _seconds(run, 0.5),
            "prompt_tokens": snap.prompt_tokens.get(lane, 0),
            "generated_tokens": snap.generated_tokens.get(lane, 0),
        }
    rows = snap.histograms[("batch_rows", "")]
    return {
        "object": "inferq.status",
        "lanes": lanes,
        "engine_calls": rows.count,
        "rows_per_call": round(rows.total / rows.count, 2) if rows.count else None,
        "workers": [
            {
                "worker_id": w.get("worker_id"),
                "model": w.get("model"),
                "pid": w.get("pid"),
                "busy_ratio": w.get("busy_ratio"),
                "jobs_done": w.get("jobs_done"),
                "tokens_generated": w.get("tokens_generated"),
                "tokens_per_s": w.get("tokens_per_s"),
                "gpu_memory_bytes": w.get("gpu_memory_bytes"),
                "at": w.get("at"),
            }
            for w in view.workers
        ],
        "recent_failures": view.failures,
    }
