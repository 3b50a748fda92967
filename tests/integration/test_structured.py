"""Structured outputs, tool calls and logprobs through the real stack (API, Celery worker,
ms-swift on the tiny random model, whose text is gibberish: only constrained decoding can
make it valid), in both engine modes, with the `openai` SDK as the client."""

from __future__ import annotations

import io
import json
from typing import Any, Literal

import httpx
import jsonschema_rs
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field

from tests.support.openai_schema import assert_openai, assert_openai_all
from tests.support.stack import Stack
from tests.support.wait import eventually
from tests.unit.test_guided_engine import LABEL, NESTED, PERSON, WEATHER, _fmt


def _client(stack: Stack) -> Any:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


class Ticket(BaseModel):
    """What `chat.completions.parse` turns into a strict JSON schema."""

    title: str = Field(max_length=10)
    priority: int = Field(ge=1, le=5)
    kind: Literal["bug", "feature", "question"]


def test_json_schema_and_parse_give_valid_objects(any_stack: Stack) -> None:
    client = _client(any_stack)
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "extract the person"}],
        response_format=_fmt(PERSON),
        max_tokens=200,
        temperature=0.9,
        n=2,
    )
    assert len(out.choices) == 2
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema_rs.validate(PERSON, json.loads(choice.message.content or ""))
    parsed = client.chat.completions.parse(
        model="tiny",
        messages=[{"role": "user", "content": "file a ticket"}],
        response_format=Ticket,
        max_tokens=200,
    )
    ticket = parsed.choices[0].message.parsed
    assert isinstance(ticket, Ticket) and 1 <= ticket.priority <= 5


def test_a_mixed_backlog_gives_each_row_its_own_shape(any_stack: Stack) -> None:
    """Three schemas and plain rows share engine calls; plain greedy rows give their solo text."""
    stack = any_stack
    plain = [("plain one", 21), ("plain two " + "w " * 5, 13)]
    alone = [stack.wait_job(stack.submit(p, max_tokens=mt, temperature=0)) for p, mt in plain]
    stack.block_worker()
    shaped = [(PERSON, 0.0), (NESTED, 0.8), (LABEL, 1.0), (PERSON, 0.5), (NESTED, 0.0), (LABEL, 0.0)]
    ids = [
        stack.submit(f"row {k}", response_format=_fmt(s), temperature=t, max_tokens=200)
        for k, (s, t) in enumerate(shaped)
    ]
    plain_ids = [stack.submit(p, max_tokens=mt, temperature=0) for p, mt in plain]
    done = [stack.wait_job(j, timeout=120) for j in ids]
    for job, (schema, _t) in zip(done, shaped, strict=True):
        assert job["status"] == "succeeded", job
        choice = job["result"]["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema_rs.validate(schema, json.loads(choice["message"]["content"]))
    together = [stack.wait_job(j) for j in plain_ids]
    assert all(j["engine_rows"] > 1 for j in [*done, *together]), [j["engine_rows"] for j in done]
    for a, t in zip(alone, together, strict=True):
        assert t["result"]["choices"][0]["message"] == a["result"]["choices"][0]["message"]


def test_json_mode_output_parses_when_it_ends(stack: Stack, demo_model: Any) -> None:
    """Any JSON object (no schema): an output that ends by itself parses; one cut by
    max_tokens says `length` (biasing '}' makes the random model close its objects)."""
    from transformers import AutoTokenizer

    close = AutoTokenizer.from_pretrained(demo_model).convert_tokens_to_ids("}")
    client = _client(stack)
    ended = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_object"},
        logit_bias={str(close): 8},
        max_tokens=300,
        temperature=1.0,
        seed=4,
        n=3,
    )
    for choice in ended.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(json.loads(choice.message.content or ""), dict)
    cut = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "json"}],
        response_format={"type": "json_object"},
        max_tokens=3,
    )
    assert cut.choices[0].finish_reason == "length" and (cut.choices[0].message.content or "").startswith("{")


def _check_call(call: Any) -> None:
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema_rs.validate(WEATHER["function"]["parameters"], json.loads(call.function.arguments))


@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_enforced_tool_calls_are_valid_streamed_or_not(any_stack: Stack, choice: Any) -> None:
    client = _client(any_stack)
    other = {
        "type": "function",
        "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
    }
    tools: Any = [WEATHER, other] if choice != "required" else [WEATHER]
    kw: dict[str, Any] = dict(
        model="tiny",
        messages=[{"role": "user", "content": "weather in Paris for 3 days?"}],
        tools=tools,
        tool_choice=choice,
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0.7,
    )
    out = client.chat.completions.create(**kw)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    _check_call(msg.tool_calls[0])

    deltas: list[Any] = []
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            deltas += ch.delta.tool_calls or []
            assert not ch.delta.content  # the tags never reach content
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    head, *rest = deltas
    assert head.index == 0 and head.id and head.function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in rest)  # name and id once, then fragments
    args = "".join(d.function.arguments or "" for d in deltas)
    jsonschema_rs.validate(WEATHER["function"]["parameters"], json.loads(args))


def test_a_tool_round_trip(any_stack: Stack) -> None:
    """Assistant tool_calls, then the tool's answer, rendered by the template; the model answers."""
    client = _client(any_stack)
    first = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
    )
    call = first.choices[0].message.tool_calls[0]
    answer = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "user", "content": "weather?"},
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],
        tools=[WEATHER],
        tool_choice="auto",
        max_tokens=8,
    )
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content
    # the call and the tool's answer are in the prompt (the template's hermes rendering)
    assert answer.usage is not None and first.usage is not None
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + 20


def test_logprobs_over_http_streamed_or_not(any_stack: Stack) -> None:
    client = _client(any_stack)
    kw: dict[str, Any] = dict(
        model="tiny",
        messages=[{"role": "user", "content": "lp"}],
        max_tokens=10,
        logprobs=True,
        top_logprobs=3,
    )
    out = client.chat.completions.create(temperature=0, **kw)
    content = out.choices[0].logprobs.content
    assert content is not None and len(content) == out.usage.completion_tokens == 10
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].bytes == e.bytes
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
    streamed: list[Any] = []
    text = ""
    for chunk in client.chat.completions.create(stream=True, temperature=1.0, seed=2, **kw):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            streamed += (ch.logprobs.content or []) if ch.logprobs else []
    assert len(streamed) == 10 and all(e.logprob <= 0 for e in streamed)
    assert b"".join(bytes(e.bytes) for e in streamed).decode("utf-8", "replace") == text


def test_a_batch_file_with_a_schema_per_line(stack: Stack) -> None:
    client = _client(stack)
    schemas: list[Any] = [PERSON, LABEL, NESTED, None]
    lines = []
    for k, schema in enumerate(schemas):
        body: dict[str, Any] = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"line {k}"}],
            "max_tokens": 200,
        }
        if schema is not None:
            body["response_format"] = _fmt(schema)
        lines.append(
            json.dumps({"custom_id": f"c{k}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    f = client.files.create(file=("lines.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def ended() -> Any:
        now = client.batches.retrieve(batch.id)
        return now if now.status in ("completed", "failed", "cancelled") else None

    batch = eventually(ended, timeout=120, interval=0.2, message=lambda: client.batches.retrieve(batch.id))
    assert batch.status == "completed" and batch.output_file_id, batch
    rows = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    by_id = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in rows}
    for k, schema in enumerate(schemas[:3]):
        assert by_id[f"c{k}"]["finish_reason"] == "stop"
        jsonschema_rs.validate(schema, json.loads(by_id[f"c{k}"]["message"]["content"]))


def _refused(stack: Stack, **body: Any) -> dict[str, Any]:
    before = httpx.get(f"{stack.base_url}/v1/jobs", params={"limit": 100}, timeout=30).json()["data"]
    resp = httpx.post(
        f"{stack.base_url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], **body},
        timeout=30,
    )
    assert resp.status_code == 400, resp.text
    after = httpx.get(f"{stack.base_url}/v1/jobs", params={"limit": 100}, timeout=30).json()["data"]
    assert [j["id"] for j in after] == [j["id"] for j in before]  # refused before it was queued
    return dict(resp.json()["error"])


def test_schemas_the_compiler_cannot_take_are_400s_naming_the_field(stack: Stack) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    err = _refused(stack, response_format=_fmt(bad))
    assert err["param"] == "response_format" and "strin" in err["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}
    err = _refused(stack, tools=[tool], tool_choice="required")
    assert err["param"] == "tools[0].function.parameters" and "nowhere" in err["message"]
    err = _refused(stack, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err["param"] == "tool_choice"
    with pytest.raises(BadRequestError) as info:
        _client(stack).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
    assert info.value.param == "top_logprobs"


def test_a_template_without_a_tool_format_refuses_tools(echo_stack: Stack) -> None:
    resp = httpx.post(
        f"{echo_stack.base_url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]},
        timeout=30,
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools", resp.text
    assert "tool-call format" in resp.json()["error"]["message"]


def test_what_a_vllm_load_tester_sends_is_honoured(any_stack: Stack) -> None:
    """`ignore_eos` and `stream_options.continuous_usage_stats` (with every request of a
    popular load tester): usage on every chunk, the final one exact."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "load"}],
        "max_tokens": 24,
        "stream": True,
        "ignore_eos": True,
        "min_tokens": 24,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    usages = []
    with httpx.stream("POST", f"{any_stack.base_url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                usages.append(json.loads(line[6:])["usage"])
    assert all(u is not None for u in usages) and len(usages) >= 3
    counts = [u["completion_tokens"] for u in usages]
    # in between: each token event's text tokenized as it comes (an estimate); the last is exact
    assert counts[0] == 0 and counts[-1] == 24 and any(c > 0 for c in counts[1:-1])
    assert len({u["prompt_tokens"] for u in usages}) == 1


def test_answers_and_chunks_match_openais_published_schema(stack: Stack) -> None:
    """Tool calls, logprobs and their stream chunks, in the shape OpenAI publishes."""
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "logprobs": True,
        "top_logprobs": 2,
        "max_tokens": 200,
    }
    resp = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert_openai("CreateChatCompletionResponse", resp.json())
    chunks = []
    with httpx.stream(
        "POST", f"{stack.base_url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    assert_openai_all(("CreateChatCompletionStreamResponse", c) for c in chunks)
