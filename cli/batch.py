"""`inferq batch ...`: a batch's whole life from the shell: submit a JSONL file, follow it
with a progress bar (again after a Ctrl-C), list, cancel, retry its failed lines, download
its output and error files."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from cli.batch_follow import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    TERMINAL,
    fetch,
    file_source,
    note,
    result,
    summary,
    wait_and_end,
)
from cli.batch_follow import _check as _check  # `inferq status` and `top` read answers the same way
from cli.batch_follow import _fail as _fail

EXIT_CODES = """\
exit codes:
  0    done; with --wait: the batch completed and every line succeeded
       (with --allow-failed: the batch completed, whatever some lines did)
  1    no such FILE (or a directory), the API did not answer, or it answered an error
  2    a usage mistake (an unknown flag, a missing argument)
  3    with --wait: the batch ended but not every line succeeded (some failed, or the batch
       failed, expired or was cancelled); the error file says why, `retry` runs them again
  130  interrupted (Ctrl-C): the batch runs on; `inferq batch status ID --wait` follows it again
"""


def _connection_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    """`--url` and `--api-key`, before or after the subcommand (the subcommand's copy has no
    default, so it never hides one given before it; cli/api_options.py does the same for the
    copy before `batch`)."""
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


def _wait_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    p.add_argument("--output", type=Path, help="with --wait: write the output file here")
    p.add_argument("--errors", type=Path, help="with --wait: write the error file here")
    p.add_argument(
        "--allow-failed",
        action="store_true",
        help="with --wait: exit 0 when the batch completed even if some lines failed",
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "batch", help="submit and follow OpenAI-format JSONL batches", epilog=EXIT_CODES, formatter_class=fmt
    )
    _connection_args(p, defaults=True)
    bsub = p.add_subparsers(dest="batch_cmd", required=True)
    commands = (
        ("submit", "upload FILE and create a batch (prints its id; with --wait, its end)"),
        ("status", "a batch's state (with --wait: follow it to its end, e.g. after a Ctrl-C)"),
        ("list", "your batches, newest first"),
        ("cancel", "cancel a batch: lines not started never run"),
        ("retry", "a new batch of a finished one's failed lines (prints its id)"),
        ("download", "save a batch's output and error files (so far, while it runs)"),
    )
    for name, what in commands:
        c = bsub.add_parser(name, help=what, description=what, epilog=EXIT_CODES, formatter_class=fmt)
        _connection_args(c, defaults=False)
        c.add_argument("--json", action="store_true", help="print the API's JSON instead of a summary")
        if name == "submit":
            c.add_argument("file", type=Path)
        elif name == "list":
            c.add_argument("--limit", type=int, default=20, help="show this many (default 20)")
        else:
            c.add_argument("batch_id")
        if name in ("submit", "status", "retry"):
            _wait_args(c)
        elif name == "download":
            c.add_argument("--output", type=Path, help="default: BATCH_ID.output.jsonl here")
            c.add_argument("--errors", type=Path, help="default: BATCH_ID.errors.jsonl here")


def run(args: argparse.Namespace) -> int:
    """One clear line and a non-zero exit for a missing file, an unreachable server or an
    error answer, never a traceback."""
    if problem := _usage_problem(args):
        return _fail(problem, EXIT_USAGE)
    if args.batch_cmd == "submit" and (problem := _file_problem(args.file)):
        return _fail(problem)
    try:
        return _run(args, Console(stderr=True))
    except httpx.HTTPError as exc:
        return _fail(f"cannot reach the inferq API at {args.url}: {exc}")
    except OSError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # before the batch existed: once it does, wait_and_end names it
        note("interrupted")
        return EXIT_INTERRUPTED


def _usage_problem(args: argparse.Namespace) -> str | None:
    """--output/--errors without --wait were once silently ignored: nothing was written."""
    if getattr(args, "wait", True) or args.batch_cmd == "download":
        return None
    given = [flag for flag in ("output", "errors") if getattr(args, flag, None)]
    if given:
        return f"--{given[0]} needs --wait (or save a batch's files with `inferq batch download ID`)"
    return None


def _file_problem(path: Path) -> str | None:
    """Said as it is: a directory is not "no such file"."""
    if path.is_dir():
        return f"{path} is a directory, not a JSONL file"
    if not path.exists():
        return f"{path}: no such file"
    return None


def _run(args: argparse.Namespace, console: Console) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    commands: dict[str, Callable[[httpx.Client, argparse.Namespace, Console], int]] = {
        "submit": _submit,
        "status": _status,
        "list": _list,
        "cancel": _cancel,
        "retry": _retry,
        "download": _download,
    }
    with httpx.Client(base_url=args.url, timeout=60, headers=headers) as client:
        return commands[args.batch_cmd](client, args, console)


def _created(client: httpx.Client, b: dict[str, Any], args: argparse.Namespace, console: Console) -> int:
    """A new batch (submit, retry): its id, or with --wait its end."""
    if args.wait:
        return wait_and_end(client, b["id"], console, args)
    result(json.dumps(b) if args.json else b["id"])
    return EXIT_OK


def _submit(client: httpx.Client, args: argparse.Namespace, console: Console) -> int:
    with args.file.open("rb") as fh:
        f = _check(client.post("/v1/files", files={"file": (args.file.name, fh)}, data={"purpose": "batch"}))
    body = {"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    b = _check(client.post("/v1/batches", json=body))
    note(f"batch {b['id']} created from {f['id']} ({f['bytes']} bytes)")
    return _created(client, b, args, console)


def _retry(client: httpx.Client, args: argparse.Namespace, console: Console) -> int:
    b = _check(client.post(f"/v1/batches/{args.batch_id}/retry"))
    note(f"batch {b['id']} runs the {b['request_counts']['total']} failed line(s) of {args.batch_id} again")
    return _created(client, b, args, console)


def _status(client: httpx.Client, args: argparse.Namespace, console: Console) -> int:
    if args.wait:
        return wait_and_end(client, args.batch_id, console, args)
    b = _check(client.get(f"/v1/batches/{args.batch_id}"))
    result(json.dumps(b) if args.json else summary(b))
    return EXIT_OK


def _cancel(client: httpx.Client, args: argparse.Namespace, console: Console) -> int:
    b = _check(client.post(f"/v1/batches/{args.batch_id}/cancel"))
    result(json.dumps(b) if args.json else summary(b))
    return EXIT_OK


def _list(client: httpx.Client, args: argparse.Namespace, console: Console) -> int:
    """The API pages by 100 at most: pages are read until --limit batches came."""
    if args.limit < 1:
        return _fail("--limit must be at least 1", EXIT_USAGE)
    data: list[dict[str, Any]] = []
    page: dict[str, Any] = {"has_more": True}
    while page["has_more"] and len(data) < args.limit:
        params: dict[str, Any] = {"limit": min(args.limit - len(data), 100)}
        if data:
            params["after"] = data[-1]["id"]
        page = _check(client.get("/v1/batches", params=params))
        data += page["data"]
    if args.json:
        ids = {"first_id": data[0]["id"], "last_id": data[-1]["id"]} if data else {}
        result(json.dumps({"object": "list", "data": data, **ids, "has_more": page["has_more"]}))
        return EXIT_OK
    result(_table(data))
    if page["has_more"]:
        note(f"more batches: --limit {args.limit * 2} shows more")
    return EXIT_OK


def _table(batches: list[dict[str, Any]]) -> str:
    """Plain columns, not a rich table: a pipe to grep or awk gets one batch a line."""
    rows = [("ID", "STATUS", "DONE", "FAILED", "TOTAL", "CREATED")]
    for b in batches:
        c = b["request_counts"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(b["created_at"])))
        rows.append((b["id"], b["status"], str(c["completed"]), str(c["failed"]), str(c["total"]), created))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def _download(client: httpx.Client, args: argparse.Namespace, console: Console) -> int:
    """The finished batch's files; while it runs, the lines finished so far (the API's
    partial output). A default path of a kind the batch has none of is not written."""
    b = _check(client.get(f"/v1/batches/{args.batch_id}"))
    done = b["status"] in TERMINAL
    written: dict[str, str | None] = {}
    for kind, file_id, given in (
        ("output", b.get("output_file_id"), args.output),
        ("errors", b.get("error_file_id"), args.errors),
    ):
        partial = f"/v1/batches/{b['id']}/output?kind={'output' if kind == 'output' else 'error'}"
        source = file_source(file_id) if done else partial
        if not source and not given:
            written[kind] = None
            if not args.json:
                result(f"{kind}: none (the batch has no {kind} file)")
            continue
        path: Path = given or Path(f"{b['id']}.{kind}.jsonl")
        lines = fetch(client, source, path)
        written[kind] = str(path.resolve())
        if not args.json:
            result(f"{kind}: {lines} line(s) in {path}")
    if args.json:
        result(json.dumps({"id": b["id"], "status": b["status"], **written}))
    if not done:
        note(f"batch {b['id']} is {b['status']}: these are the lines finished so far")
    return EXIT_OK
