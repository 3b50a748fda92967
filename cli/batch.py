"""`inferq batch ...`: submit a JSONL file, follow it with a progress bar, fetch the output."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def _connection_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    """`--url` and `--api-key`, before or after the subcommand (the subcommand's copy has no
    default, so it never hides one given before it)."""
    p.add_argument(
        "--url",
        default=os.environ.get("INFERQ_URL", "http://127.0.0.1:8000") if defaults else argparse.SUPPRESS,
        help="inferq API base URL (env INFERQ_URL)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("INFERQ_API_KEY", "") if defaults else argparse.SUPPRESS,
        help="API key, when the server has keys (env INFERQ_API_KEY)",
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("batch", help="submit and follow OpenAI-format JSONL batches")
    _connection_args(p, defaults=True)
    bsub = p.add_subparsers(dest="batch_cmd", required=True)
    s = bsub.add_parser("submit", help="upload FILE and create a batch")
    _connection_args(s, defaults=False)
    s.add_argument("file", type=Path)
    s.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    s.add_argument("--output", type=Path, help="with --wait: write the output file here")
    s.add_argument("--errors", type=Path, help="with --wait: write the error file here")
    for name in ("status", "cancel"):
        c = bsub.add_parser(name, help=f"{name} a batch")
        _connection_args(c, defaults=False)
        c.add_argument("batch_id")


def _check(resp: httpx.Response) -> dict[str, Any]:
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        raise SystemExit(f"error {resp.status_code}: {message}")
    return dict(resp.json())


def _summary(b: dict[str, Any]) -> str:
    c = b["request_counts"]
    return (
        f"{b['id']}  {b['status']}  done {c['completed']}  failed {c['failed']}  total {c['total']}"
        f"  output {b.get('output_file_id') or '-'}  errors {b.get('error_file_id') or '-'}"
    )


def follow(client: httpx.Client, batch_id: str, console: Console) -> dict[str, Any]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TextColumn("{task.fields[rate]:.1f} lines/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    start = time.monotonic()
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("validating", total=None, failed=0, rate=0.0)
        interval = 0.5
        while True:
            resp = client.get(f"/v1/batches/{batch_id}")
            if resp.status_code == 429:  # a rate-limited key: wait as told, then look again
                time.sleep(float(resp.headers.get("retry-after") or 5))
                continue
            b = _check(resp)
            c = b["request_counts"]
            done = c["completed"] + c["failed"]
            rate = done / max(time.monotonic() - start, 1e-6)
            progress.update(
                task,
                description=b["status"],
                total=c["total"] or None,
                completed=done,
                failed=c["failed"],
                rate=rate,
            )
            if b["status"] in TERMINAL:
                return b
            time.sleep(interval)
            interval = min(interval * 1.25, 5.0)  # a long batch is not polled twice a second


def _download(client: httpx.Client, file_id: str | None, path: Path | None) -> None:
    """Into PATH only once the whole file came: an error answer or a broken connection
    leaves no PATH that looks like output."""
    if not path:
        return
    if not file_id:  # none of that kind: an empty PATH, not an earlier run's lines
        path.write_bytes(b"")
        return
    part = path.with_name(f".{path.name}.part")
    try:
        with client.stream("GET", f"/v1/files/{file_id}/content") as resp:
            if resp.status_code >= 400:
                resp.read()
                _check(resp)
            with part.open("wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    """One clear line and a non-zero exit for a missing file, an unreachable server or an
    error answer, never a traceback."""
    console = Console(stderr=True)
    if args.batch_cmd == "submit" and not args.file.is_file():
        return _fail(f"{args.file}: no such file")
    try:
        return _run(args, console)
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach the inferq API at {args.url}: {exc}")
    except OSError as exc:
        return _fail(str(exc))


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")  # one line, unwrapped (rich wraps at 80 columns)
    return 1


def _run(args: argparse.Namespace, console: Console) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=60, headers=headers) as client:
        if args.batch_cmd == "submit":
            with args.file.open("rb") as fh:
                f = _check(
                    client.post("/v1/files", files={"file": (args.file.name, fh)}, data={"purpose": "batch"})
                )
            b = _check(
                client.post(
                    "/v1/batches",
                    json={
                        "input_file_id": f["id"],
                        "endpoint": "/v1/chat/completions",
                        "completion_window": "24h",
                    },
                )
            )
            console.print(f"batch {b['id']} created from {f['id']} ({f['bytes']} bytes)")
            if args.wait:
                b = follow(client, b["id"], console)
                _download(client, b.get("output_file_id"), args.output)
                _download(client, b.get("error_file_id"), args.errors)
                console.print(_summary(b))
                if b.get("error_file_id") and not args.errors:
                    console.print("some lines failed or did not run: --errors PATH saves why")
            sys.stdout.write(json.dumps(b) + "\n")
            return 0 if b["status"] in ("completed", "validating", "in_progress") else 1
        if args.batch_cmd == "status":
            b = _check(client.get(f"/v1/batches/{args.batch_id}"))
        else:
            b = _check(client.post(f"/v1/batches/{args.batch_id}/cancel"))
        console.print(_summary(b))
        sys.stdout.write(json.dumps(b) + "\n")
        return 0
