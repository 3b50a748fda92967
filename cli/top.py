"""`inferq status` (once, `--json` for scripts) and `inferq top` (live): the API's GET /status,
which reads the same numbers as GET /metrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from cli.batch import _check, _fail


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, what in (
        ("status", "print the system's state once"),
        ("top", "a live view of lanes and workers"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("--url", default=os.environ.get("INFERQ_URL", "http://127.0.0.1:8000"))
        p.add_argument(
            "--token",
            default=os.environ.get("INFERQ_METRICS_TOKEN", ""),
            help="metrics token, from a host other than the API's (env INFERQ_METRICS_TOKEN)",
        )
        if name == "status":
            p.add_argument("--json", action="store_true", help="the whole state as one JSON object")
        else:
            p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")


def _seconds(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"


def render(state: dict[str, Any], tokens_per_s: dict[str, float] | None = None) -> Group:
    lanes = Table(title="lanes", title_justify="left", expand=True)
    for col in ("lane", "depth", "wait p50", "wait p99", "run p50", "ok", "failed", "cancel"):
        lanes.add_column(col, justify="left" if col == "lane" else "right", no_wrap=col == "lane")
    for lane, row in state["lanes"].items():
        done = row["finished"]
        lanes.add_row(
            lane.removeprefix("inferq."),  # on 80 columns the three full names read "inferq…"
            str(row["depth"]),
            _seconds(row["wait_p50_s"]),
            _seconds(row["wait_p99_s"]),
            _seconds(row["run_p50_s"]),
            str(done["succeeded"]),
            str(done["failed"]),
            str(done["cancelled"]),
        )
    rows = state["rows_per_call"] if state["rows_per_call"] is not None else "-"
    workers = Table(
        title=f"workers   (engine calls {state['engine_calls']}, rows per call {rows})",
        title_justify="left",
        expand=True,
    )
    for col in ("worker", "model", "busy", "jobs", "tokens/s"):
        workers.add_column(
            col, justify="left" if col in ("worker", "model") else "right", no_wrap=col == "worker"
        )
    for w in state["workers"]:
        rate = (tokens_per_s or {}).get(w["worker_id"])
        workers.add_row(
            w["worker_id"],
            w["model"],
            f"{(w['busy_ratio'] or 0) * 100:.0f} %",
            str(w["jobs_done"]),
            f"{rate:.0f}" if rate is not None else "-",
        )
    if not state["workers"]:
        workers.add_row("(no live worker)", "", "", "", "")
    failures = Table(title="recent failures", title_justify="left", expand=True)
    for col in ("job", "lane", "code", "message"):
        failures.add_column(col, overflow="fold" if col == "job" else "ellipsis")  # a job id, whole
    for f in state["recent_failures"][:5]:
        lane = str(f.get("lane")).removeprefix("inferq.")
        failures.add_row(str(f.get("job_id")), lane, str(f.get("code")), str(f.get("message"))[:80])
    return Group(lanes, workers, failures)


def _rates(prev: dict[str, Any] | None, cur: dict[str, Any], dt: float) -> dict[str, float]:
    if prev is None or dt <= 0:
        return {}
    before = {w["worker_id"]: w.get("tokens_generated") or 0 for w in prev["workers"]}
    return {
        w["worker_id"]: ((w.get("tokens_generated") or 0) - before[w["worker_id"]]) / dt
        for w in cur["workers"]
        if w["worker_id"] in before
    }


def run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        with httpx.Client(base_url=args.url, timeout=10, headers=headers) as client:
            if args.cmd == "status":
                state = _check(client.get("/status"))
                if args.json:
                    sys.stdout.write(json.dumps(state) + "\n")
                else:
                    Console().print(render(state))
                return 0
            return _top(client, args.interval)
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach the inferq API at {args.url}: {exc}")
    except KeyboardInterrupt:
        return 0


def _top(client: httpx.Client, interval: float) -> int:
    prev: tuple[float, dict[str, Any]] | None = None
    with Live(auto_refresh=False, screen=False) as live:
        while True:
            state = _check(client.get("/status"))
            now = time.monotonic()
            rates = _rates(prev[1] if prev else None, state, now - prev[0] if prev else 0.0)
            live.update(render(state, rates), refresh=True)
            prev = (now, state)
            time.sleep(max(interval, 0.2))
