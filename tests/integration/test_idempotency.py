"""`Idempotency-Key` on the creating POSTs (api.idempotency), against running stacks: the echo
stack for the plumbing, the real one for a chat request still in flight. No keys on those
stacks: every request's owner is ""."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import httpx
import redis

from core import keys
from tests.support.stack import Stack
from tests.support.wait import eventually
from workers.engines.echo import FAIL_TRIGGER

REPLAYED = "idempotent-replayed"


def _key() -> str:
    return f"idem-{uuid.uuid4().hex}"


def _job(run: str, content: str = "hello") -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "metadata": {"run": run}}


def _jobs_of_run(c: httpx.Client, run: str) -> list[str]:
    return [j["id"] for j in c.get("/v1/jobs", params={"metadata[run]": run, "limit": 100}).json()["data"]]


def test_a_job_is_replayed_not_created_again(echo_stack: Stack) -> None:
    run, key = uuid.uuid4().hex, _key()
    with echo_stack.client() as c:
        first = c.post("/v1/jobs", json=_job(run), headers={"Idempotency-Key": key})
        again = c.post("/v1/jobs", json=_job(run), headers={"Idempotency-Key": key})
        assert first.status_code == 202, first.text
        assert REPLAYED not in first.headers
        assert again.status_code == 202 and again.headers[REPLAYED] == "true"
        assert again.json() == first.json()
        assert again.headers["content-type"] == first.headers["content-type"]
        assert _jobs_of_run(c, run) == [first.json()["id"]]


def test_the_same_key_with_another_body_is_a_422(echo_stack: Stack) -> None:
    run, key = uuid.uuid4().hex, _key()
    with echo_stack.client() as c:
        assert c.post("/v1/jobs", json=_job(run), headers={"Idempotency-Key": key}).status_code == 202
        other = c.post("/v1/jobs", json=_job(run, "something else"), headers={"Idempotency-Key": key})
        assert other.status_code == 422, other.text
        error = other.json()["error"]
        assert (error["param"], error["code"]) == ("Idempotency-Key", "idempotency_key_reused")
        assert len(_jobs_of_run(c, run)) == 1


def test_twenty_at_once_with_one_key_make_one_job(echo_stack: Stack) -> None:
    run, key = uuid.uuid4().hex, _key()

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=echo_stack.base_url, timeout=60) as c:
            posts = [c.post("/v1/jobs", json=_job(run), headers={"Idempotency-Key": key}) for _ in range(20)]
            return await asyncio.gather(*posts)

    answers = asyncio.run(all_at_once())
    assert [a.status_code for a in answers] == [202] * 20, [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert sum(1 for a in answers if REPLAYED not in a.headers) == 1
    with echo_stack.client() as c:
        assert _jobs_of_run(c, run) == list(ids)


def test_files_and_batches_are_replayed(echo_stack: Stack) -> None:
    """httpx picks a new multipart boundary per request: the retry must still match."""
    name, line = (
        f"{uuid.uuid4().hex}.jsonl",
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        },
    )
    content = (json.dumps(line) + "\n").encode()
    key = _key()
    with echo_stack.client() as c:
        uploads = [
            c.post(
                "/v1/files",
                files={"file": (name, content, "application/jsonl")},
                data={"purpose": "batch"},
                headers={"Idempotency-Key": key},
            )
            for _ in range(2)
        ]
        assert [u.status_code for u in uploads] == [200, 200], uploads[0].text
        assert uploads[1].headers[REPLAYED] == "true"
        file_id = uploads[0].json()["id"]
        assert uploads[1].json()["id"] == file_id
        listed = c.get("/v1/files", params={"limit": 10000}).json()["data"]
        assert [f["id"] for f in listed if f["filename"] == name] == [file_id]

        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        bkey = _key()
        batches = [c.post("/v1/batches", json=body, headers={"Idempotency-Key": bkey}) for _ in range(2)]
        assert [b.status_code for b in batches] == [200, 200], batches[0].text
        assert batches[1].headers[REPLAYED] == "true"
        assert batches[1].json()["id"] == batches[0].json()["id"]


def test_a_chat_completion_is_replayed(echo_stack: Stack) -> None:
    key = _key()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "echo me"}], "max_tokens": 8}
    with echo_stack.client() as c:
        first = c.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
        again = c.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    assert again.headers[REPLAYED] == "true"
    assert again.json() == first.json()  # the same completion id: nothing ran twice


def test_a_streamed_answer_is_named_not_replayed(echo_stack: Stack) -> None:
    key = _key()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "s"}], "max_tokens": 4, "stream": True}
    with echo_stack.client() as c:
        first = c.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == 200 and "data: [DONE]" in first.text
        job = first.headers["x-inferq-job-id"]
        again = c.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "idempotency_key_streamed"
    assert job in again.json()["error"]["message"] and again.headers["x-inferq-job-id"] == job


def test_a_4xx_is_kept_a_5xx_is_not(echo_stack: Stack) -> None:
    """A 400 is the request's own fault: the same request gets it again, replayed. A 500 (the
    generation failed) may not happen again: the key is released and the retry runs."""
    with echo_stack.client() as c:
        key = _key()
        bad = [c.post("/v1/jobs", json={"model": "tiny"}, headers={"Idempotency-Key": key}) for _ in range(2)]
        assert [b.status_code for b in bad] == [400, 400]
        assert REPLAYED not in bad[0].headers and bad[1].headers[REPLAYED] == "true"

        key = _key()
        body = {"model": "tiny", "messages": [{"role": "user", "content": FAIL_TRIGGER}]}
        failed = [
            c.post("/v1/chat/completions", json=body, headers={"Idempotency-Key": key}) for _ in range(2)
        ]
        assert [f.status_code for f in failed] == [500, 500], failed[0].text
        assert REPLAYED not in failed[1].headers
        client = redis.Redis.from_url(echo_stack.redis_url)
        try:
            assert not client.exists(keys.idempotency("", "POST /v1/chat/completions", key))
        finally:
            client.close()


def test_a_key_over_255_characters_is_a_400(echo_stack: Stack) -> None:
    with echo_stack.client() as c:
        resp = c.post("/v1/jobs", json=_job("long"), headers={"Idempotency-Key": "k" * 256})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["param"], error["code"]) == ("Idempotency-Key", "invalid_idempotency_key")


def test_a_chat_request_still_in_flight_is_a_409(stack: Stack) -> None:
    """The real stack: the worker is held by a long job, so the first chat request waits."""
    blocker = stack.block_worker()
    key = _key()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "wait"}], "max_tokens": 2}
    answers: list[httpx.Response] = []

    def first() -> None:
        answers.append(
            httpx.post(
                f"{stack.base_url}/v1/chat/completions",
                json=body,
                headers={"Idempotency-Key": key},
                timeout=120,
            )
        )

    thread = threading.Thread(target=first)
    thread.start()
    client = redis.Redis.from_url(stack.redis_url)
    try:
        eventually(
            lambda: client.exists(keys.idempotency("", "POST /v1/chat/completions", key)),
            message="the first request claimed its key",
        )
        again = httpx.post(
            f"{stack.base_url}/v1/chat/completions", json=body, headers={"Idempotency-Key": key}, timeout=30
        )
        assert again.status_code == 409, again.text
        assert again.json()["error"]["code"] == "idempotency_key_in_flight"
    finally:
        httpx.post(f"{stack.base_url}/v1/jobs/{blocker}/cancel", timeout=30)
        thread.join(120)
        client.close()
    assert answers and answers[0].status_code == 200, answers
    replay = httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=body, headers={"Idempotency-Key": key}, timeout=30
    )
    assert replay.headers[REPLAYED] == "true" and replay.json() == answers[0].json()
