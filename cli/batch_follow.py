"""What every `inferq batch` command shares: reading the API's answers, following a batch with
a progress bar to its end, fetching its files, and the exit code its end gives."""

from __future__ import annotations

import argparse
import json
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

#: the exit codes of `inferq batch` (also in its --help epilog and README)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LINES_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _check(resp: httpx.Response) -> dict[str, Any]:
    """The answer's JSON; an error answer ends the command with its one-line message."""
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        raise SystemExit(f"error {resp.status_code}: {message}")
    return dict(resp.json())


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    sys.stderr.write(f"error: {message}\n")  # one line, unwrapped (rich wraps at 80 columns)
    return code


def note(message: str) -> None:
    """A line for the person at the terminal, on stderr: stdout holds only the result."""
    sys.stderr.write(f"{message}\n")


def result(text: str) -> None:
    """The command's result on stdout (a summary line, a table, an id, or the JSON)."""
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def summary(b: dict[str, Any]) -> str:
    c = b["request_counts"]
    return (
        f"{b['id']}  {b['status']}  done {c['completed']}  failed {c['failed']}  total {c['total']}"
        f"  output {b.get('output_file_id') or '-'}  errors {b.get('error_file_id') or '-'}"
    )


def follow(client: httpx.Client, batch_id: str, console: Console) -> dict[str, Any]:
    """Polls the batch until it ends, as a progress bar on stderr; returns its last state."""
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


def fetch(client: httpx.Client, source: str | None, path: Path) -> int:
    """Writes what GET `source` answers to PATH, only once the whole of it came (an error
    answer or a broken connection leaves no PATH that looks like output); no source: an
    empty PATH, not an earlier run's lines. Returns the number of lines written."""
    if not source:
        path.write_bytes(b"")
        return 0
    part = path.with_name(f".{path.name}.part")
    lines = 0
    try:
        with client.stream("GET", source) as resp:
            if resp.status_code >= 400:
                resp.read()
                _check(resp)
            with part.open("wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
                    lines += chunk.count(b"\n")
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)
    return lines


def file_source(file_id: str | None) -> str | None:
    return f"/v1/files/{file_id}/content" if file_id else None


def end(
    client: httpx.Client,
    b: dict[str, Any],
    output: Path | None,
    errors: Path | None,
    flags: argparse.Namespace,
) -> int:
    """What `--wait` does once the batch ended, for submit, status and retry alike: the files
    asked for, the summary line (or the JSON), a hint when lines failed, and the exit code."""
    for file_id, path in ((b.get("output_file_id"), output), (b.get("error_file_id"), errors)):
        if path:
            fetch(client, file_source(file_id), path)
            note(f"wrote {path}")
    result(json.dumps(b) if flags.json else summary(b))
    failed = b["request_counts"]["failed"]
    if b["status"] == "failed":
        first = ((b.get("errors") or {}).get("data") or [{}])[0]
        note(f"batch {b['id']} failed: {first.get('message', 'no reason given')}")
    elif failed and not errors:
        note(
            f"{failed} line(s) failed: `inferq batch download {b['id']}` saves why, "
            f"`inferq batch retry {b['id']}` runs them again"
        )
    if b["status"] == "completed" and (failed == 0 or flags.allow_failed):
        return EXIT_OK
    return EXIT_LINES_FAILED


def wait_and_end(client: httpx.Client, batch_id: str, console: Console, flags: argparse.Namespace) -> int:
    """`--wait`: the progress bar, then `end`. Ctrl-C leaves the batch running and says how
    to follow it again."""
    try:
        b = follow(client, batch_id, console)
    except KeyboardInterrupt:
        note(
            f"interrupted: batch {batch_id} runs on; `inferq batch status {batch_id} --wait` follows it again"
        )
        return EXIT_INTERRUPTED
    return end(client, b, flags.output, flags.errors, flags)
