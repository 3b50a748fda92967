"""`inferq batch` over a batch's whole life, as a user runs it: real `inferq` processes
against a real stack (the echo engine for the plumbing, the real one for failed lines,
download and retry). What a script relies on is checked: the exit code, stdout holding only
the result (a summary line, a table, an id; JSON with --json), one line for an error."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from cli.processes import free_port
from tests.support import ROOT, procs
from tests.support.stack import Stack, cli_env
from tests.support.wait import eventually
from workers.engines.echo import SLOW_TRIGGER


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return procs.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=cwd,
        env=cli_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _line(custom_id: str, content: str = "hi", **body: Any) -> str:
    request = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **body}
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": request}
    )


def _file(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The command's result: exactly one line on stdout, and no JSON unless --json."""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and not lines[0].startswith("{"), proc.stdout + proc.stderr
    return lines[0]


def test_url_and_api_key_before_the_subcommand(echo_stack: Stack, tmp_path: Path) -> None:
    src = _file(tmp_path / "in.jsonl", _line("a"))
    created = _cli("--url", echo_stack.base_url, "--api-key", "unused", "batch", "submit", str(src))
    assert created.returncode == 0, created.stderr
    batch_id = _one_line(created)
    assert batch_id.startswith("batch_"), created.stdout
    status = _cli("--url", echo_stack.base_url, "batch", "status", batch_id, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == batch_id, status.stderr
    # after the subcommand's subcommand it still wins over the one before
    dead = f"http://127.0.0.1:{free_port()}"
    after = _cli("--url", dead, "batch", "status", batch_id, "--url", echo_stack.base_url)
    assert after.returncode == 0 and _one_line(after).startswith(batch_id), after.stderr
    system = _cli("--url", echo_stack.base_url, "status", "--json")  # `inferq status` too
    assert system.returncode == 0 and "workers" in json.loads(system.stdout), system.stderr
    refused = _cli("--url", echo_stack.base_url, "keys", "create", "x")  # not ignored in silence
    assert refused.returncode == 2 and "takes no --url" in refused.stderr, refused.stderr


def test_a_directory_as_the_file_says_so(tmp_path: Path) -> None:
    proc = _cli("batch", "--url", f"http://127.0.0.1:{free_port()}", "submit", str(tmp_path))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1 and f"{tmp_path} is a directory" in text and "no such file" not in text, text
    assert len(text.strip().splitlines()) == 1, text


def test_list_shows_the_newest_batches_as_a_table(echo_stack: Stack, tmp_path: Path) -> None:
    src = _file(tmp_path / "in.jsonl", _line("a"), _line("b"))
    ids = [_one_line(_cli("batch", "submit", str(src), "--url", echo_stack.base_url)) for _ in range(3)]
    table = _cli("batch", "list", "--limit", "2", "--url", echo_stack.base_url)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split() == ["ID", "STATUS", "DONE", "FAILED", "TOTAL", "CREATED"]
    # the newest, --limit of them (the API orders batches created within one second by id)
    assert {row.split()[0] for row in rows} == {ids[1], ids[2]}
    assert all(row.split()[4] == "2" for row in rows) and "--limit" in table.stderr  # more: said how
    listed = _cli("batch", "list", "--limit", "3", "--json", "--url", echo_stack.base_url)
    page = json.loads(listed.stdout)
    assert page["object"] == "list" and page["has_more"] and {b["id"] for b in page["data"]} == set(ids)


def test_status_wait_follows_again_after_a_ctrl_c(echo_stack: Stack, tmp_path: Path) -> None:
    src = _file(tmp_path / "slow.jsonl", *(_line(f"s{i}", SLOW_TRIGGER) for i in range(5)))
    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        waiting = procs.popen(
            [
                sys.executable,
                "-m",
                "cli.main",
                "batch",
                "submit",
                str(src),
                "--wait",
                "--url",
                echo_stack.base_url,
            ],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            # a test run in the background may inherit SIGINT ignored; a terminal's Ctrl-C is not
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    created = eventually(
        lambda: stderr.read_text() if "created" in stderr.read_text() else None,
        timeout=60,
        message=lambda: f"no batch created: {stderr.read_text()!r}",
    )
    batch_id = created.split()[1]
    waiting.send_signal(signal.SIGINT)
    out, _ = waiting.communicate(timeout=60)
    said = stderr.read_text()
    assert waiting.returncode == 130 and out == "", said
    assert f"inferq batch status {batch_id} --wait" in said and "Traceback" not in said, said
    again = _cli("batch", "status", batch_id, "--wait", "--url", echo_stack.base_url)
    assert again.returncode == 0, again.stderr
    assert _one_line(again).split()[:6] == [batch_id, "completed", "done", "5", "failed", "0"]
    assert "completed" in again.stderr and "5/5" in again.stderr  # the progress bar, at its end


def test_failed_lines_exit_code_download_and_retry(stack: Stack, tmp_path: Path) -> None:
    src = _file(tmp_path / "in.jsonl", _line("ok1"), _line("bad", temperature=-1), _line("ok2"))
    url = ("--url", stack.base_url)
    done = _cli("batch", "submit", str(src), "--wait", *url)
    assert done.returncode == 3, done.stdout + done.stderr  # a line failed: not a success
    summary = _one_line(done)  # the summary line, not the whole batch as JSON after it
    batch_id = summary.split()[0]
    assert summary.split()[1:8] == ["completed", "done", "2", "failed", "1", "total", "3"], summary
    assert f"inferq batch download {batch_id}" in done.stderr
    # re-attached to a finished batch: the same end; partial success accepted when asked
    accepted = _cli("batch", "status", batch_id, "--wait", "--allow-failed", *url)
    assert accepted.returncode == 0 and _one_line(accepted) == summary, accepted.stderr

    got = _cli("batch", "download", batch_id, *url, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    out, errors = tmp_path / f"{batch_id}.output.jsonl", tmp_path / f"{batch_id}.errors.jsonl"
    assert str(out.name) in got.stdout and str(errors.name) in got.stdout  # it says where they went
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == ["ok1", "ok2"]
    [error] = [json.loads(x) for x in errors.read_text().splitlines()]
    assert error["custom_id"] == "bad" and "temperature" in error["response"]["body"]["error"]["message"]

    retried = _cli("batch", "retry", batch_id, *url)
    assert retried.returncode == 0, retried.stderr
    new_id = _one_line(retried)
    assert new_id.startswith("batch_") and new_id != batch_id
    end = _cli("batch", "status", new_id, "--wait", "--json", *url)
    assert end.returncode == 3, end.stderr  # the same bad line, failed again
    final = json.loads(end.stdout)
    assert final["retry_of"] == batch_id and final["request_counts"] == {
        "total": 1,
        "completed": 0,
        "failed": 1,
    }
