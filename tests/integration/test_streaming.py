"""Live tokens end to end: SSE with resume and replay, cancel that stops generation, and
/v1/chat/completions driven by the official openai SDK — real worker, real engine."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, cast

import httpx
import openai
import pytest

from tests.support.sse import final_text, iter_sse, read_job_events
from tests.support.stack import Stack

LONG = 1900  # the test model never emits EOS: this runs for seconds unless cancelled


def _job(stack: Stack, content: str, **kw: object) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}
    resp = httpx.post(f"{stack.base_url}/v1/jobs", json=body, timeout=30)
    assert resp.status_code == 202, resp.text
    return dict(resp.json())


def test_concurrent_streams_deltas_equal_final_content(any_stack: Stack) -> None:
    stack = any_stack
    jobs = [
        _job(stack, f"stream {i}", max_tokens=64, temperature=0.9, n=2 if i == 0 else 1) for i in range(3)
    ]
    results: dict[str, list] = {}

    def follow(job_id: str) -> None:
        results[job_id] = read_job_events(stack.base_url, job_id)

    threads = [threading.Thread(target=follow, args=(j["id"],)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for job in jobs:
        events = results[job["id"]]
        kinds = [e.event for e in events]
        assert kinds[0] == "status" and events[0].data["status"] == "queued"
        running = next(e.data for e in events if e.event == "status" and e.data["status"] == "running")
        assert running["attempt"] == 1  # a number, as in token events
        assert "running" in [e.data.get("status") for e in events if e.event == "status"]
        assert kinds[-1] == "done" and kinds.count("done") == 1
        assert kinds.count("token") >= 2  # real streaming, not one blob at the end
        ids = [tuple(map(int, e.id.split("-"))) for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        result = events[-1].data
        assert result["object"] == "chat.completion" and result["usage"]["completion_tokens"] > 0
        for choice in result["choices"]:
            assert final_text(events, choice["index"]) == choice["message"]["content"]


def test_resume_with_last_event_id_and_replay_after_completion(stack: Stack) -> None:
    job = _job(stack, "resume me", max_tokens=96, temperature=0.7)
    stack.wait_job(job["id"])
    replay = read_job_events(stack.base_url, job["id"])  # subscribe after it finished: whole stream
    tokens = [i for i, e in enumerate(replay) if e.event == "token"]
    assert len(tokens) >= 3
    cut = tokens[len(tokens) // 2]
    resumed = read_job_events(stack.base_url, job["id"], last_event_id=replay[cut].id)
    assert [(e.id, e.event, e.data) for e in resumed] == [(e.id, e.event, e.data) for e in replay[cut + 1 :]]
    head = "".join(e.data["text"] for e in replay[: cut + 1] if e.event == "token")
    tail = "".join(e.data["text"] for e in resumed if e.event == "token")
    assert head + tail == replay[-1].data["choices"][0]["message"]["content"]


def test_bad_last_event_id_and_unknown_job(stack: Stack) -> None:
    job = _job(stack, "x", max_tokens=2)
    bad = httpx.get(f"{stack.base_url}/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
    assert httpx.get(f"{stack.base_url}/v1/jobs/job_missing/events").status_code == 404


def _wait_first_token(stack: Stack, job_id: str) -> None:
    with httpx.stream("GET", f"{stack.base_url}/v1/jobs/{job_id}/events", timeout=60) as resp:
        for ev in iter_sse(resp):
            if ev.event == "token":
                return
    raise AssertionError("no token arrived")


def test_cancel_running_and_queued_jobs(any_stack: Stack) -> None:
    stack = any_stack
    # all 8 rows of the worker taken (in continuous mode a job joins while rows are free)
    running = _job(stack, "long one", max_tokens=LONG, temperature=0.8, n=8)
    queued = _job(stack, "behind it", max_tokens=8)
    _wait_first_token(stack, running["id"])
    c = httpx.post(f"{stack.base_url}/v1/jobs/{queued['id']}/cancel")
    assert c.status_code == 200 and c.json()["status"] == "cancelled"
    c = httpx.post(f"{stack.base_url}/v1/jobs/{running['id']}/cancel")
    assert c.status_code == 200
    done = stack.wait_job(running["id"], timeout=30)
    assert done["status"] == "cancelled"
    assert done["result"]["usage"]["completion_tokens"] < 8 * LONG // 4  # stopped, not run to the end
    events = read_job_events(stack.base_url, running["id"])
    assert events[-1].event == "cancelled"
    assert final_text(events) == done["result"]["choices"][0]["message"]["content"]
    time.sleep(0.5)  # time passing is the point: the worker's chance to (wrongly) run the cancelled job
    q = httpx.get(f"{stack.base_url}/v1/jobs/{queued['id']}").json()
    assert q["status"] == "cancelled" and q["attempts"] == 0 and q["started_at"] is None
    again = httpx.post(f"{stack.base_url}/v1/jobs/{running['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"


@pytest.fixture()
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_sdk_non_streaming_and_streaming_agree(client: openai.OpenAI) -> None:
    msgs: list[Any] = [{"role": "user", "content": "sdk"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 40
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 40 and len({c.id for c in chunks}) == 1


def test_openai_sdk_errors_are_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=99)
    assert "'n'" in str(info.value)


def test_raw_stream_ends_with_done_and_disconnect_cancels(any_stack: Stack) -> None:
    stack = any_stack
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "curl"}],
        "max_tokens": 8,
        "stream": True,
    }
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}

    # A client that goes away mid-stream: a raw socket, closed after a few chunks.
    payload = json.dumps({**body, "max_tokens": LONG}).encode()
    host, port = stack.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        received = b""
        while received.count(b'"content": "') < 4:
            received += sock.recv(4096)
    job_id = received.split(b"x-inferq-job-id: ")[1].split(b"\r\n")[0].decode()
    done = stack.wait_job(job_id, timeout=30)
    assert done["status"] == "cancelled"
    assert done["result"]["usage"]["completion_tokens"] < LONG // 4


def test_only_jobs_someone_follows_write_token_events(any_stack: Stack) -> None:
    """A non-stream chat request waits for its result only: its job writes no token events
    (the worker's and Valkey's CPU go to work someone reads); a /v1/jobs job keeps its token
    stream, since clients may subscribe and replay it at any time."""
    import redis

    r = redis.Redis.from_url(any_stack.redis_url, decode_responses=True)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tokens for nobody"}], "max_tokens": 12}
    with any_stack.client() as c:
        done = c.post("/v1/chat/completions", json=body).json()
    assert done["usage"]["completion_tokens"] > 0 and done["choices"][0]["message"]["content"]
    chat_job = "job_" + done["id"].removeprefix("chatcmpl-")
    chat_types = [fields["type"] for _, fields in cast(list[Any], r.xrange(f"inferq:events:{chat_job}"))]
    assert "done" in chat_types and "token" not in chat_types, chat_types

    job = any_stack.submit("tokens for someone", max_tokens=12)
    assert any_stack.wait_job(job)["status"] == "succeeded"
    job_types = [fields["type"] for _, fields in cast(list[Any], r.xrange(f"inferq:events:{job}"))]
    assert "token" in job_types and job_types[-1] == "done", job_types
