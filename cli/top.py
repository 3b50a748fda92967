"""`inferq status` (once, `--json` for scripts) and `inferq top` (live): the API's GET /status,
which reads the same numbers as GET /metrics.

Latency percentiles are estimates interpolated within histogram buckets (core.metrics), so
they are shown as "~1.2 s"; tokens/s is each worker's own rate over its last heartbeat
interval (tasks.child), so `status` has it too. `top` reads single key presses: `q` quits."""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import termios
import time
import tty
from types import TracebackType
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cli.batch_follow import _check, _fail


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


#: under the tables: what "~" means, and (top) how to quit
ESTIMATES = "~ estimated from histogram buckets"
QUIT = "q: quit"


def _estimate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"~{v * 1000:.0f} ms" if v < 1 else f"~{v:.1f} s"


def render(state: dict[str, Any], footer: str = ESTIMATES) -> Group:
    lanes = Table(title="lanes", title_justify="left", expand=True)
    for col in ("lane", "depth", "wait p50", "wait p99", "run p50", "ok", "failed", "cancel"):
        lanes.add_column(col, justify="left" if col == "lane" else "right", no_wrap=col == "lane")
    for lane, row in state["lanes"].items():
        done = row["finished"]
        lanes.add_row(
            lane.removeprefix("inferq."),  # on 80 columns the three full names read "inferq…"
            str(row["depth"]),
            _estimate(row["wait_p50_s"]),
            _estimate(row["wait_p99_s"]),
            _estimate(row["run_p50_s"]),
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
        rate = w.get("tokens_per_s")  # None: a worker of an older release
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
    return Group(lanes, workers, failures, Text(footer, style="dim"))


class Keys:
    """Single key presses from the terminal, without Enter: cbreak mode, which keeps Ctrl-C
    working, restored on the way out. Off a terminal (a pipe, a cron job) there are none
    and `wait` only waits."""

    def __init__(self) -> None:
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):  # no stdin, or a replaced one
            fd = -1
        self.fd = fd if fd >= 0 and os.isatty(fd) else None
        self._saved: list[Any] | None = None

    def __enter__(self) -> Keys:
        if self.fd is not None:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd is not None and self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def wait(self, seconds: float) -> str:
        """The keys pressed within `seconds` ("" if none), returning at the first press."""
        if self.fd is None:
            time.sleep(seconds)
            return ""
        ready, _, _ = select.select([self.fd], [], [], seconds)
        return os.read(self.fd, 64).decode(errors="replace") if ready else ""


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
    """Refresh every `interval` until `q` (or Ctrl-C); a key other than `q` is ignored."""
    with Keys() as keys, Live(auto_refresh=False, screen=False) as live:
        footer = f"{QUIT if keys.fd is not None else 'Ctrl-C: quit'}   {ESTIMATES}"
        while True:
            live.update(render(_check(client.get("/status")), footer), refresh=True)
            deadline = time.monotonic() + max(interval, 0.2)
            while (left := deadline - time.monotonic()) > 0:
                if "q" in keys.wait(left).lower():
                    return 0
