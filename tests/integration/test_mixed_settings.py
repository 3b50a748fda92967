"""Requests with different settings share engine calls on a real worker (real ms-swift,
tiny model): a mixed backlog runs in batches > 1, each greedy job's text equals the same
request run alone, each job keeps its own `max_tokens` and `stop`, a seeded job its text,
and a bad request still fails alone."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.support.stack import Stack
from tests.support.wait import eventually
from workers.engines.echo import FAIL_TRIGGER, SLOW_TRIGGER


def _content(job: dict[str, Any]) -> str:
    return str(job["result"]["choices"][0]["message"]["content"])


def test_a_mixed_settings_backlog_shares_engine_calls_and_keeps_each_jobs_settings(any_stack: Stack) -> None:
    stack = any_stack
    greedy = [(f"greedy {i} " + "w " * (3 * i), 20 + 7 * i) for i in range(3)]
    alone = [stack.wait_job(stack.submit(p, max_tokens=mt, temperature=0)) for p, mt in greedy]
    # a stop sequence that the first greedy text is known to contain, early in it (plain
    # characters: the gibberish model also says bytes that are no text on their own)
    text0 = _content(alone[0])
    at = next(
        i for i in range(2, len(text0)) if text0[i : i + 2].isascii() and text0[i : i + 2].isprintable()
    )
    stop = text0[at : at + 2]
    cut = text0[: text0.find(stop)]
    seeded = {"max_tokens": 24, "temperature": 1.0, "seed": 7, "top_p": 0.95}
    seeded_alone = stack.wait_job(stack.submit("seeded", **seeded))
    assert all(j["engine_rows"] == 1 for j in [*alone, seeded_alone])

    stack.block_worker()
    mixed: list[tuple[str, dict[str, Any]]] = [
        (greedy[0][0], {"max_tokens": greedy[0][1], "temperature": 0, "stop": [stop]}),
        ("sampled a", {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9}),
        (greedy[1][0], {"max_tokens": greedy[1][1], "temperature": 0}),
        ("sampled b", {"max_tokens": 40, "temperature": 1.2, "top_k": 5, "presence_penalty": 1.0}),
        ("seeded", seeded),
        (greedy[2][0], {"max_tokens": greedy[2][1], "temperature": 0}),
        ("sampled c", {"max_tokens": 13, "temperature": 1.0, "frequency_penalty": 0.5, "n": 2}),
    ]
    ids = [stack.submit(p, **kw) for p, kw in mixed]
    done = [stack.wait_job(j) for j in ids]
    assert all(j["status"] == "succeeded" for j in done), done
    assert all(j["engine_rows"] > 1 for j in done), [j["engine_rows"] for j in done]

    # greedy rows: the text they give alone, whatever their batch-mates ask
    assert _content(done[0]) == cut and done[0]["result"]["choices"][0]["finish_reason"] == "stop"
    assert done[0]["result"]["usage"]["completion_tokens"] < greedy[0][1]
    for k, a in ((2, alone[1]), (5, alone[2])):
        assert _content(done[k]) == _content(a)
        assert done[k]["result"]["usage"] == a["result"]["usage"]
    # every row stops at its own limit (the demo model never says EOS)
    for job, (_p, kw) in zip(done, mixed, strict=True):
        if "stop" not in kw:
            n = kw.get("n", 1)
            assert job["result"]["usage"]["completion_tokens"] == kw["max_tokens"] * n
            assert all(c["finish_reason"] == "length" for c in job["result"]["choices"])
    # a seeded job: the same text in a mixed batch as alone
    assert _content(done[4]) == _content(seeded_alone)
    # n siblings of a seeded or unseeded job are not copies of each other
    assert len({c["message"]["content"] for c in done[6]["result"]["choices"]}) == 2


def test_a_bad_setting_is_refused_by_name(stack: Stack) -> None:
    resp = httpx.post(
        f"{stack.base_url}/v1/jobs",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_k": -5},
        timeout=30,
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "top_k", resp.text


def test_a_poisoned_request_in_a_mixed_batch_fails_alone(echo_stack: Stack) -> None:
    blocker = echo_stack.submit(SLOW_TRIGGER)  # keeps the worker busy while the others queue up
    echo_stack.wait_running(blocker)
    settings: list[dict[str, Any]] = [
        {"max_tokens": 3, "temperature": 0},
        {"max_tokens": 9, "temperature": 0.7, "top_p": 0.9},
        {"max_tokens": 5, "temperature": 1.0},
        {"max_tokens": 2, "stop": ["zz"]},
        {"max_tokens": 7, "seed": 3},
    ]
    jobs = [
        echo_stack.submit(FAIL_TRIGGER if i == 2 else f"ok {i} a b c d e f g h i j", **kw)
        for i, kw in enumerate(settings)
    ]
    results = [echo_stack.wait_job(j) for j in jobs]
    echo_stack.wait_job(blocker)
    assert [r["status"] for r in results] == ["succeeded", "succeeded", "failed", "succeeded", "succeeded"]
    assert all(r["engine_rows"] == 5 for r in results)  # one engine call for all five
    for r, kw in zip(results, settings, strict=True):
        if r["status"] == "succeeded":
            assert r["result"]["usage"]["completion_tokens"] == kw["max_tokens"]


def test_continuous_an_interactive_request_starts_while_long_jobs_hold_every_row(
    continuous_stack: Stack,
) -> None:
    stack = continuous_stack
    long_jobs = [stack.submit(f"long {i}", max_tokens=1500, temperature=0.8) for i in range(8)]
    with stack.client() as c:
        eventually(
            lambda: sum(c.get(f"/v1/jobs/{j}").json()["status"] == "running" for j in long_jobs) == 8,
            timeout=60,
            message="all eight long jobs running",
        )
        queued = stack.submit("behind the long ones", max_tokens=4)  # /v1/jobs: waits for a row
        resp = c.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "now"}], "max_tokens": 4},
        )
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
        states = [c.get(f"/v1/jobs/{j}").json()["status"] for j in long_jobs]
        assert states == ["running"] * 8  # it did not wait for a row to free
        assert c.get(f"/v1/jobs/{queued}").json()["status"] == "queued"
        for j in [*long_jobs, queued]:
            c.post(f"/v1/jobs/{j}/cancel")
    for j in long_jobs:
        assert stack.wait_job(j)["status"] == "cancelled"


def test_a_batch_file_with_mixed_settings_shares_engine_calls(any_stack: Stack) -> None:
    """Batch lines (no token streaming) with their own settings, one of them invalid."""
    stack = any_stack
    settings: list[dict[str, Any]] = [
        {"max_tokens": 3 + i, "temperature": [0, 0.7, 1.0][i % 3], "top_p": [0.9, 1.0][i % 2]}
        for i in range(11)
    ]
    settings[5] = {"max_tokens": 4, "temperature": 9}  # invalid: the line fails, not the batch
    lines = [
        json.dumps(
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "tiny", "messages": [{"role": "user", "content": f"line {i}"}], **kw},
            }
        )
        for i, kw in enumerate(settings)
    ]
    with stack.client() as c:
        f = c.post(
            "/v1/files", files={"file": ("m.jsonl", "\n".join(lines).encode())}, data={"purpose": "batch"}
        )
        body = {
            "input_file_id": f.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        batch = c.post("/v1/batches", json=body).json()
        batch_id = batch["id"]

        def completed() -> dict | None:
            now: dict = c.get(f"/v1/batches/{batch_id}").json()
            return now if now["status"] == "completed" else None

        batch = eventually(
            completed, timeout=120, interval=0.1, message=lambda: c.get(f"/v1/batches/{batch_id}").json()
        )
        assert batch["request_counts"] == {"total": 11, "completed": 10, "failed": 1}
        out = [json.loads(x) for x in c.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]
        err = [json.loads(x) for x in c.get(f"/v1/files/{batch['error_file_id']}/content").text.splitlines()]
    assert [e["custom_id"] for e in err] == ["c5"]
    for line in out:
        i = int(line["custom_id"][1:])
        usage = line["response"]["body"]["usage"]
        assert usage["completion_tokens"] == settings[i]["max_tokens"]
    sizes = [
        stack.wait_job(line["response"]["body"]["id"].replace("chatcmpl-", "job_"))["engine_rows"]
        for line in out
    ]
    assert max(sizes) > 1
