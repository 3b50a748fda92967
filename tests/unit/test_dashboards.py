"""The shipped dashboard and autoscaler example query only series that /metrics exposes,
and the metric families render from an empty store (a fresh install has a dashboard too)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from api.status_view import SystemView, render, status
from core import metrics
from tests.support import ROOT

DEPLOY = ROOT / "docs" / "deploy"
LANES = ["inferq.interactive@m", "inferq.jobs@m", "inferq.batch@m"]  # model "m"'s (core.lanes)


def _exposed(view: SystemView) -> set[str]:
    text = render(view, CollectorRegistry()).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def _view() -> SystemView:
    worker = {"worker_id": "h:1", "model": "m", "busy_ratio": 0.5, "gpu_memory_bytes": 1024}
    return SystemView(metrics.decode({}, LANES), [worker], [])


def test_the_dashboard_and_keda_query_exposed_series() -> None:
    exposed = _exposed(_view()) | {"http_requests_total"}  # the instrumentator's, in the API
    board = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    for keda in yaml.safe_load_all((DEPLOY / "keda-scaledobject.yaml").read_text()):
        exprs += [t["metadata"]["query"] for t in keda["spec"]["triggers"]]
    used = {m for e in exprs for m in re.findall(r"\b(?:inferq|http)_[a-z_]+", e)}
    assert used and used <= exposed, used - exposed
    for name in ("inferq_queue_depth", "inferq_jobs_finished_total", "inferq_engine_batch_rows_bucket"):
        assert name in exposed


def test_an_empty_store_renders_zeros_for_every_lane() -> None:
    text = render(_view(), CollectorRegistry()).decode()
    for lane in LANES:
        queue = lane.removesuffix("@m")
        assert f'inferq_queue_depth{{lane="{queue}",model="m"}} 0.0' in text
        assert f'inferq_jobs_finished_total{{lane="{queue}",model="m",status="failed"}} 0.0' in text
    state = status(_view())
    assert state["lanes"]["inferq.jobs@m"]["wait_p50_s"] is None and state["rows_per_call"] is None


def test_every_model_has_its_own_depth_for_a_scaler() -> None:
    """KEDA scales each model's pool on its own depth: the model is a label of its own."""
    raw = {"depth|inferq.jobs@chat": "7", "depth|inferq.batch@coder": "3"}
    view = SystemView(metrics.decode(raw, LANES), [], [])
    depth = {
        (s.labels["lane"], s.labels["model"]): s.value
        for f in text_string_to_metric_families(render(view, CollectorRegistry()).decode())
        for s in f.samples
        if s.name == "inferq_queue_depth"
    }
    assert depth[("inferq.jobs", "chat")] == 7 and depth[("inferq.batch", "coder")] == 3
    assert depth[("inferq.jobs", "m")] == 0


def test_histograms_decode_to_cumulative_buckets_and_quantiles() -> None:
    idx = metrics.bucket_index("queue_wait", 0.3)  # in the (0.25, 0.5] bucket
    raw = {
        f"h|queue_wait|inferq.jobs|{idx}": "3",
        "h|queue_wait|inferq.jobs|0": "1",
        "s|queue_wait|inferq.jobs": "1.0",
    }
    h = metrics.decode(raw, LANES).histograms[("queue_wait", "inferq.jobs")]
    assert h.count == 4 and h.total == 1.0
    cumulative = dict(h.cumulative())
    assert cumulative["0.01"] == 1 and cumulative["0.5"] == 4 and cumulative["+Inf"] == 4
    # interpolated within the bucket, as histogram_quantile: not the bucket's edge (0.5)
    assert h.quantile(0.25) == 0.01 and h.quantile(0.5) == pytest.approx(0.25 + 0.25 / 3)


@pytest.mark.parametrize(
    ("counts", "q", "expected"),
    [
        ({0: 4}, 0.5, 0.005),  # the first bucket starts at 0
        ({9: 10}, 0.5, 7.5),  # all in (5, 10]: halfway is 7.5 s, not "10.0 s"
        ({9: 10}, 0.99, 5 + 5 * 0.99),
        ({7: 1, 9: 1}, 0.5, 2.5),  # the rank falls at the end of the first occupied bucket
        ({8: 2, 17: 1}, 0.99, 3600.0),  # past the last bound: that bound (all that is known)
    ],
)
def test_quantiles_are_interpolated_like_prometheus(
    counts: dict[int, int], q: float, expected: float
) -> None:
    raw = {f"h|queue_wait|inferq.jobs|{i}": str(n) for i, n in counts.items()}
    h = metrics.decode(raw, LANES).histograms[("queue_wait", "inferq.jobs")]
    assert h.quantile(q) == pytest.approx(expected)


def test_inferq_top_renders_the_status_it_reads() -> None:
    import io

    from rich.console import Console

    from cli.top import QUIT, render

    raw = {f"h|queue_wait|inferq.jobs@m|{metrics.bucket_index('queue_wait', 4.0)}": "2"}
    state = status(SystemView(metrics.decode(raw, LANES), _view().workers, []))
    state["workers"][0]["tokens_per_s"] = 200.0  # the worker's own rate, from its heartbeat
    out = io.StringIO()
    Console(file=out, width=80).print(render(state, f"{QUIT}   ~ estimates"))  # a pipe or a small terminal
    text = out.getvalue()
    assert all(lane.removeprefix("inferq.") in text for lane in LANES), text  # not "inferq…" thrice
    assert "h:1" in text and "200" in text and "50 %" in text
    assert "~3.8 s" in text and " 5.0 s" not in text, text  # estimates, said so; not the edge
    assert "q: quit" in text
