"""Batches end to end with the official openai SDK: upload, run on the real worker, read the
output and error files line by line; cancel mid-run; retry what did not finish."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support import ROOT, procs
from tests.support.stack import Stack
from tests.support.wait import eventually


def _line(custom_id: str | None, content: str = "hi", url: str = "/v1/chat/completions", **body: Any) -> str:
    item: dict[str, Any] = {
        "method": "POST",
        "url": url,
        "body": {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            **body,
        },
    }
    if custom_id is not None:
        item["custom_id"] = custom_id
    return json.dumps(item)


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _wait(client: openai.OpenAI, batch_id: str, until: set[str], timeout: float = 120) -> Any:
    def reached() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in until else None

    return eventually(
        reached,
        timeout=timeout,
        interval=0.2,
        message=lambda: f"batch {batch_id} still {client.batches.retrieve(batch_id).status}",
    )


def _jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()]


def test_mixed_file_through_the_sdk(client: openai.OpenAI) -> None:
    lines = [
        _line("a1", "first"),  # 1 good
        "{not json",  # 2 not JSON
        _line(None),  # 3 no custom_id
        _line("a1", "again"),  # 4 duplicate custom_id
        _line("u1", url="/v1/embeddings"),  # 5 other url
        _line("b1", temperature=-1),  # 6 invalid body
        _line("a2", "second", n=2),  # 7 good, n=2
        _line("m1", model="nope"),  # 8 unknown model
        "",  #   blank: ignored
        _line("a3", "third", temperature=0),  # 10 good
        _line("a4", "fourth", stop=["zz"]),  # 11 good
    ]
    data = ("\n".join(lines) + "\n").encode()
    f = client.files.create(file=("mixed.jsonl", io.BytesIO(data)), purpose="batch")
    assert f.object == "file" and f.bytes == len(data) and f.purpose == "batch"
    batch = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "mixed"},
    )
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "mixed"}
    done = _wait(client, batch.id, {"completed", "failed"})
    assert done.status == "completed"
    counts = done.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (10, 4, 6)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert any(b.id == batch.id for b in client.batches.list())

    out = _jsonl(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == ["a1", "a2", "a3", "a4"]
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"].startswith("job_")
        assert o["response"]["body"]["object"] == "chat.completion"
    a2 = next(o for o in out if o["custom_id"] == "a2")
    assert len(a2["response"]["body"]["choices"]) == 2
    usage = done.usage
    assert usage is not None
    assert usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)
    assert usage.input_tokens == sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in out)

    errs = {}
    for e in _jsonl(client, done.error_file_id):
        message = e["response"]["body"]["error"]["message"]
        errs[int(message.split(":")[0].removeprefix("line "))] = e
    assert sorted(errs) == [2, 3, 4, 5, 6, 8]
    assert "JSON" in errs[2]["response"]["body"]["error"]["message"]
    for e in errs.values():  # its line number once: no "line 1 column 2" of the JSON parser
        assert e["response"]["body"]["error"]["message"].count("line") == 1, e
    assert "custom_id" in errs[3]["response"]["body"]["error"]["message"]
    # the key is on every line, null where the line had no usable custom_id
    assert all("custom_id" in e for e in errs.values()), errs
    assert errs[2]["custom_id"] is None and errs[3]["custom_id"] is None
    assert "duplicate" in errs[4]["response"]["body"]["error"]["message"] and errs[4]["custom_id"] == "a1"
    assert "url" in errs[5]["response"]["body"]["error"]["message"]
    assert "temperature" in errs[6]["response"]["body"]["error"]["message"]
    assert errs[8]["response"]["status_code"] == 404 and errs[8]["custom_id"] == "m1"
    assert all(errs[n]["response"]["status_code"] == 400 for n in (2, 3, 4, 5, 6))
    assert done.errors is not None and sorted(e.line for e in done.errors.data) == [2, 3, 4, 5, 6, 8]


def test_cancel_mid_run_then_retry(client: openai.OpenAI, stack: Stack) -> None:
    n = 24
    data = "\n".join(_line(f"c{i}", f"cancel me {i}", max_tokens=300) for i in range(n)).encode()
    f = client.files.create(file=("long.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    eventually(
        lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2,  # type: ignore[union-attr]
        timeout=60,
        interval=0.1,
        message="two requests completed",
    )
    partial = httpx.get(f"{stack.base_url}/v1/batches/{batch.id}/output", params={"partial": "true"})
    assert partial.status_code == 200 and len(partial.text.splitlines()) >= 2  # output so far, while running
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _wait(client, batch.id, {"cancelled"})
    out, errs = _jsonl(client, done.output_file_id), _jsonl(client, done.error_file_id)
    assert done.request_counts.completed == len(out) >= 2
    assert len(out) < n and len(out) + len(errs) == n
    assert all(e["error"]["code"] == "batch_cancelled" and e["response"] is None for e in errs)
    assert {o["custom_id"] for o in out} | {e["custom_id"] for e in errs} == {f"c{i}" for i in range(n)}
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)

    retry = httpx.post(f"{stack.base_url}/v1/batches/{batch.id}/retry")
    assert retry.status_code == 200, retry.text
    again = _wait(client, retry.json()["id"], {"completed"})
    assert again.request_counts.total == len(errs)
    redone = _jsonl(client, again.output_file_id)
    assert sorted(o["custom_id"] for o in redone) == sorted(e["custom_id"] for e in errs)


def test_file_level_rejections(stack: Stack) -> None:
    def up(data: bytes, purpose: str = "batch") -> httpx.Response:
        return httpx.post(
            f"{stack.base_url}/v1/files", files={"file": ("f.jsonl", data)}, data={"purpose": purpose}
        )

    empty = up(b"")
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_file"
    notjsonl = up(b"hello, world\nthis is csv\n")
    assert notjsonl.status_code == 400 and notjsonl.json()["error"]["code"] == "invalid_file_format"
    purpose = up(b"{}\n", purpose="fine-tune")
    assert purpose.status_code == 400 and purpose.json()["error"]["param"] == "purpose"
    assert httpx.get(f"{stack.base_url}/v1/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert httpx.get(f"{stack.base_url}/v1/files/file-doesnotexist0").status_code == 404
    assert httpx.get(f"{stack.base_url}/v1/batches/batch_nope").status_code == 404
    ok = up(b'{"custom_id": "x"}\n')
    assert ok.status_code == 200
    fid = ok.json()["id"]
    assert httpx.get(f"{stack.base_url}/v1/files/{fid}/content").content == b'{"custom_id": "x"}\n'
    assert httpx.delete(f"{stack.base_url}/v1/files/{fid}").json() == {
        "id": fid,
        "object": "file",
        "deleted": True,
    }
    assert httpx.get(f"{stack.base_url}/v1/files/{fid}").status_code == 404


def test_cli_submit_wait_writes_output(stack: Stack, tmp_path: Path) -> None:
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    src.write_text("\n".join([*(_line(f"k{i}", f"cli {i}") for i in range(5)), "oops"]) + "\n")
    proc = procs.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "batch",
            "--url",
            stack.base_url,
            "submit",
            str(src),
            "--wait",
            "--output",
            str(out),
            "--errors",
            str(err),
            "--allow-failed",  # the "oops" line fails: exit 3 without it
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["status"] == "completed" and final["request_counts"] == {
        "total": 6,
        "completed": 5,
        "failed": 1,
    }
    assert sorted(json.loads(x)["custom_id"] for x in out.read_text().splitlines()) == [
        f"k{i}" for i in range(5)
    ]
    assert "line 6" in err.read_text()
    assert "completed" in proc.stderr  # the progress display
    status = procs.run(
        [sys.executable, "-m", "cli.main", "batch", "--url", stack.base_url, "status", final["id"], "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == final["id"]
