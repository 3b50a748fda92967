"""The Responses API's pure parts: input items as chat messages, the chat request a response
runs as, output items from a chat answer, and the stream events numbered alike on every read."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from api.errors import APIError
from api.response_stream import ResponseEvents
from api.responses import Stored, renamed
from api.streams import Event
from core.job_store import decode, encode_new
from schemas.openai import ChatCompletion
from schemas.responses import (
    ResponseCreate,
    answer_messages,
    chat_request,
    conversation_messages,
    echo_fields,
    job_id_of,
    output_items,
    response_id,
)


def test_ids_map_one_to_one() -> None:
    assert response_id("job_abc") == "resp_abc" and job_id_of("resp_abc") == "job_abc"
    assert job_id_of("chatcmpl-x") == "chatcmpl-x"


def test_function_calls_join_the_assistant_turn_and_outputs_become_tool_messages() -> None:
    body = ResponseCreate.model_validate(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "weather?"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Let me see"}],
                },
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "21"},
            ],
        }
    )
    msgs = conversation_messages(body.input_items())
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool"]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["c1", "c2"] and msgs[1]["content"] == "Let me see"
    req = chat_request(body.model_copy(update={"instructions": "Be brief"}), msgs)
    assert req.messages[0].role == "system" and req.messages[0].content == "Be brief"


def test_text_format_and_tools_become_the_chat_fields() -> None:
    body = ResponseCreate.model_validate(
        {
            "model": "m",
            "input": "x",
            "max_output_tokens": 9,
            "text": {
                "format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}
            },
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
        }
    )
    req = chat_request(body, conversation_messages(body.input_items()))
    assert req.max_tokens == 9
    dumped = req.model_dump(exclude_none=True, by_alias=True)
    assert dumped["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert dumped["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    echo = echo_fields(body)
    assert echo["text"]["format"]["schema"] == {"type": "object"} and echo["tool_choice"]["name"] == "f"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"model": "m", "input": []}, "input"),
        (
            {"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input",
        ),
        ({"model": "m", "input": "x", "store": False, "background": True}, "background"),
        ({"model": "m", "input": "x", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"model": "m", "input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
        ({"model": "m", "input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ],
)
def test_refusals_name_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        ResponseCreate.model_validate(body)
    assert exc.value.errors()[0]["loc"][0] == field


def test_chat_words_in_an_error_become_the_responses_words() -> None:
    err = renamed(APIError(400, "Invalid value for 'max_tokens': too big", param="max_tokens"))
    assert err.param == "max_output_tokens" and "'max_output_tokens'" in err.message
    assert renamed(APIError(400, "x", param="messages[0].content")).param == "input"
    assert renamed(APIError(400, "x", param="response_format.json_schema")).param == "text.format"


def _completion(content: str | None, calls: int = 0, finish: str = "stop") -> ChatCompletion:
    tool_calls = [
        {"id": f"call_{k}", "type": "function", "function": {"name": "w", "arguments": '{"a": 1}'}}
        for k in range(calls)
    ]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = tool_calls
    return ChatCompletion.model_validate(
        {
            "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )


def test_output_items_and_the_next_turn() -> None:
    items = output_items("job_1", _completion("hi", calls=2, finish="tool_calls"))
    assert [i["type"] for i in items] == ["message", "function_call", "function_call"]
    assert [i["id"] for i in items] == ["msg_1", "fc_1_0", "fc_1_1"]
    only_calls = output_items("job_1", _completion(None, calls=1, finish="tool_calls"))
    assert [i["type"] for i in only_calls] == ["function_call"]
    assert output_items("job_1", _completion("cut", finish="length"))[0]["status"] == "incomplete"
    turn = answer_messages(_completion(None, calls=1))[0]
    assert turn["content"] is None and turn["tool_calls"][0]["id"] == "call_0"


def _stored(result: ChatCompletion | None, status: str) -> Stored:
    body = ResponseCreate(model="m", input="hello")
    request = chat_request(body, conversation_messages(body.input_items()))
    raw = encode_new("job_1", request, "inferq.jobs", 1.0, 3)
    raw["status"] = status
    if result is not None:
        raw["result"] = result.model_dump_json()
    record = decode(raw)
    assert record is not None
    return Stored(record, {"echo": echo_fields(body), "conversation": [], "input_items": []})


def test_stream_events_are_the_same_on_every_read() -> None:
    job_events = [
        Event("1-0", "status", {"type": "status", "status": "queued"}),
        Event("2-0", "status", {"type": "status", "status": "running"}),
        Event("3-0", "token", {"type": "token", "index": "0", "text": "hel"}),
        Event("4-0", "token", {"type": "token", "index": "0", "text": "lo"}),
    ]
    ended = _stored(_completion("hello world"), "succeeded")

    def read() -> list[dict[str, Any]]:
        events = ResponseEvents(_stored(None, "queued"))
        out = events.opening()
        for e in job_events:
            out += events.feed(e)
        return out + events.ending(ended)

    first, second = read(), read()
    assert json.dumps(first) == json.dumps(second)
    assert [e["sequence_number"] for e in first] == list(range(len(first)))
    deltas = "".join(e["delta"] for e in first if e["type"] == "response.output_text.delta")
    assert deltas == "hello world"  # the rest of the text comes with the end
    assert first[-1]["type"] == "response.completed" and first[-1]["response"]["status"] == "completed"
