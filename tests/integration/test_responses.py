"""OpenAI's Responses API through the real stack (API, Celery worker, ms-swift on the tiny
random model), with the `openai` SDK as the client: background and polled, foreground,
streamed, resumed with `starting_after` (from another API process too), cancelled while it
generates, structured `text.format`, a function tool round trip, `previous_response_id`."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema_rs
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from cli.processes import api_argv, free_port
from tests.support import ROOT
from tests.support.stack import Stack, wait_ready
from tests.support.wait import eventually
from tests.unit.test_guided_engine import PERSON, WEATHER

FINAL = ("completed", "failed", "cancelled", "incomplete")


def _client(base_url: str) -> Any:
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _finished(client: OpenAI, rid: str, timeout: float = 90) -> Any:
    def done() -> Any:
        r = client.responses.retrieve(rid)
        return r if r.status in FINAL else None

    return eventually(done, timeout=timeout, message=f"response {rid} finished")


def _job(stack: Stack, rid: str) -> dict[str, Any]:
    job: dict[str, Any] = httpx.get(f"{stack.base_url}/v1/jobs/job_{rid[5:]}", timeout=10).json()
    return job


def test_background_response_is_polled_to_its_end(stack: Stack) -> None:
    client = _client(stack.base_url)
    created = client.responses.create(
        model="tiny",
        input="Say something.",
        instructions="Be brief.",
        max_output_tokens=12,
        background=True,
        metadata={"ticket": "T-1"},
    )
    assert created.status in ("queued", "in_progress") and created.id.startswith("resp_")
    assert created.background is True and created.metadata == {"ticket": "T-1"}
    done = _finished(client, created.id)
    assert done.status in ("completed", "incomplete")
    assert done.output_text and done.output[0].type == "message"
    assert done.usage is not None and done.usage.output_tokens > 0 and done.usage.input_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    # a response is a job underneath: the same run, the jobs lane
    job = _job(stack, created.id)
    assert job["lane"] == "inferq.jobs" and job["status"] == "succeeded"
    items = client.responses.input_items.list(created.id)
    assert [i.type for i in items.data] == ["message"]
    assert items.data[0].content[0].text == "Say something."


def test_foreground_answers_and_incomplete_names_its_reason(stack: Stack) -> None:
    client = _client(stack.base_url)
    r = client.responses.create(model="tiny", input="Go on", max_output_tokens=4, temperature=0.9)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 4
    assert _job(stack, r.id)["lane"] == "inferq.interactive"


def _read(stream: Any, limit: int | None = None) -> list[Any]:
    events = []
    for event in stream:
        events.append(event)
        if limit is not None and len(events) == limit:
            break
    stream.close()
    return events


def test_stream_events_are_numbered_and_match_the_answer(any_stack: Stack) -> None:
    client = _client(any_stack.base_url)
    events = _read(client.responses.create(model="tiny", input="Hello", max_output_tokens=16, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert kind in kinds, kinds
    assert kinds[-1] in ("response.completed", "response.incomplete")
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text != ""
    assert final.usage.output_tokens == 16


def test_a_dropped_stream_resumes_after_its_last_event(stack: Stack, tmp_path: Any) -> None:
    """Read part of a background stream, drop it, read on with `starting_after`: from this
    API and from another API process (as after a restart), the same events, numbered alike."""
    client = _client(stack.base_url)
    first = _read(
        client.responses.create(
            model="tiny", input="Tell a story", max_output_tokens=40, background=True, stream=True
        ),
        limit=4,
    )
    rid = first[0].response.id
    rest = _read(client.responses.retrieve(rid, stream=True, starting_after=first[-1].sequence_number))
    assert rest[0].sequence_number == first[-1].sequence_number + 1
    whole = [*first, *rest]
    assert [e.sequence_number for e in whole] == list(range(len(whole)))
    assert whole[-1].type in ("response.completed", "response.incomplete")

    # another API process on the same store: nothing of the stream lived in the first one
    port = free_port()
    with (tmp_path / "api2.log").open("wb") as log:
        stack.sup.start("api-2", api_argv("127.0.0.1", port), env=stack.env, cwd=ROOT, stdout=log.fileno())
    other = f"http://127.0.0.1:{port}"
    wait_ready(other)
    again = _read(_client(other).responses.retrieve(rid, stream=True, starting_after=2))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in whole[3:]]


def test_cancel_stops_the_generation_and_a_finished_one_is_returned_unchanged(stack: Stack) -> None:
    client = _client(stack.base_url)
    stream = client.responses.create(
        model="tiny",
        input="Write at length",
        max_output_tokens=600,
        temperature=0.9,
        background=True,
        stream=True,
    )
    events = iter(stream)
    r = next(events).response
    while next(events).type != "response.output_text.delta":
        pass  # until it generates
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    # the stream, followed on, ends with the cancel (the SDK takes the event)
    assert [e.type for e in events][-1] == "response.cancelled"
    job = stack.wait_job(f"job_{r.id[5:]}")
    assert job["status"] == "cancelled"
    # the engine stopped: far fewer tokens than asked for
    assert job["result"] is None or job["result"]["usage"]["completion_tokens"] < 600
    done = client.responses.create(model="tiny", input="Hi", max_output_tokens=3)
    again = client.responses.cancel(done.id)
    assert again.status == done.status and again.output_text == done.output_text


def test_text_format_json_schema_gives_valid_json(stack: Stack) -> None:
    client = _client(stack.base_url)
    r = client.responses.create(
        model="tiny",
        input="extract the person",
        max_output_tokens=200,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
    )
    assert r.status == "completed", r
    jsonschema_rs.validate(PERSON, json.loads(r.output_text))
    assert r.text is not None and r.text.format is not None and r.text.format.type == "json_schema"


def test_a_function_tool_round_trip_with_previous_response_id(stack: Stack) -> None:
    client = _client(stack.base_url)
    fn = WEATHER["function"]
    tool = {"type": "function", "name": fn["name"], "parameters": fn["parameters"]}
    first = client.responses.create(
        model="tiny",
        input="weather?",
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=200,
    )
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == fn["name"], first.output
    jsonschema_rs.validate(fn["parameters"], json.loads(calls[0].arguments))
    answer = client.responses.create(
        model="tiny",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temp": 21}'}],
        tools=[tool],
        max_output_tokens=8,
    )
    assert answer.status in ("completed", "incomplete") and answer.previous_response_id == first.id
    # the first turn (question and call) and the tool's answer are in the prompt
    assert answer.usage is not None and first.usage is not None
    assert answer.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_store_false_and_delete_forget_the_response(stack: Stack) -> None:
    client = _client(stack.base_url)
    kept = client.responses.create(model="tiny", input="Hi", max_output_tokens=2)
    deleted = client.responses.delete(kept.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(kept.id)
    unstored = client.responses.create(model="tiny", input="Hi", max_output_tokens=2, store=False)
    assert unstored.output_text
    with pytest.raises(NotFoundError):
        client.responses.retrieve(unstored.id)


def test_bad_requests_name_the_field(stack: Stack) -> None:
    client = _client(stack.base_url)
    with pytest.raises(BadRequestError) as bad:
        client.responses.create(
            model="tiny",
            input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}],
        )
    assert "text only" in str(bad.value)
    with pytest.raises(NotFoundError) as missing:
        client.responses.create(model="tiny", input="Hi", previous_response_id="resp_nope")
    assert missing.value.response.json()["error"]["param"] == "previous_response_id"
    with pytest.raises(BadRequestError) as unstored:
        client.responses.create(model="tiny", input="Hi", background=True, store=False)
    assert unstored.value.response.json()["error"]["param"] == "background"
    resp = httpx.post(
        f"{stack.base_url}/v1/responses",
        json={"model": "tiny", "input": "x" * 10, "max_output_tokens": 10**6},
        timeout=10,
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_output_tokens", resp.text


def test_a_retried_background_create_is_the_same_response(stack: Stack) -> None:
    """The SDK's POST retried with one `Idempotency-Key`: one response, the first answer."""
    client = _client(stack.base_url)
    key = {"Idempotency-Key": "resp-retry-1"}
    first = client.responses.with_raw_response.create(
        model="tiny", input="Hi", max_output_tokens=3, background=True, extra_headers=key
    )
    again = client.responses.with_raw_response.create(
        model="tiny", input="Hi", max_output_tokens=3, background=True, extra_headers=key
    )
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.parse().id == first.parse().id
    _finished(client, first.parse().id)
