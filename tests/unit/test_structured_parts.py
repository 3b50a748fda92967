"""The pure parts of structured outputs: tool calls parsed out of text and held back from a
stream, the grammar text a request asks for, schemas closed to extra keys, and the
messages the engine gets."""

from __future__ import annotations

import json
from typing import Any

import pytest
from llguidance import LLMatcher

from api.chunks import ChoiceStream
from schemas.grammar import GrammarError, check_request_grammar, closed, request_grammar
from schemas.openai import AssistantMessage, ChatCompletionRequest, Choice
from schemas.structured import NamedToolChoice, Tool, ToolCall
from schemas.tool_calls import ContentFilter, parse_tool_calls

CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


def test_calls_are_parsed_and_the_text_before_is_the_content() -> None:
    content, calls = parse_tool_calls("let me look\n" + CALL + "\n" + CALL.replace('"x": 1', '"x": 2'))
    assert content == "let me look"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("f", {"x": 1}),
        ("f", {"x": 2}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert parse_tool_calls(CALL)[0] is None
    # unclosed at the end (the tag cut by a stop word) still parses; bad JSON leaves it all text
    assert parse_tool_calls(CALL.removesuffix("\n</tool_call>"))[1][0].function.name == "f"
    assert parse_tool_calls("<tool_call>{nope</tool_call>") == ("<tool_call>{nope</tool_call>", [])
    assert parse_tool_calls("plain") == ("plain", [])


@pytest.mark.parametrize("cut", [1, 3, 5, 11, 17])
def test_a_stream_never_shows_the_tags_and_sends_the_final_content(cut: int) -> None:
    text = "Sure.  \n" + CALL
    f = ContentFilter()
    sent = "".join(f.feed(text[i : i + cut]) for i in range(0, len(text), cut))
    assert sent == parse_tool_calls(text)[0] == "Sure."
    g = ContentFilter()
    plain = "a <tool b> c < d"
    assert "".join(g.feed(plain[i : i + cut]) for i in range(0, len(plain), cut)) + g.finish(False) == plain


def test_choice_stream_sends_calls_as_openai_does() -> None:
    view = ChoiceStream(0, calls_tools=True)
    assert view.delta("<tool_") == "" and view.delta('call>\n{"name": "f"') == ""
    args = json.dumps({"x": "a" * 60})
    call = ToolCall.model_validate({"id": "call_1", "function": {"name": "f", "arguments": args}})
    choice = Choice(
        index=0, message=AssistantMessage(content=None, tool_calls=[call]), finish_reason="tool_calls"
    )
    parts = [p.model_dump() for p in view.final(choice)]
    head, *frags, last = parts
    assert head["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    ]
    assert all(set(p["delta"]["tool_calls"][0]) == {"index", "function"} for p in frags)
    assert "".join(p["delta"]["tool_calls"][0]["function"]["arguments"] for p in frags) == args
    assert last["finish_reason"] == "tool_calls" and last["delta"].get("tool_calls") is None


def _tool(name: str, params: dict[str, Any] | None = None) -> Tool:
    return Tool.model_validate({"type": "function", "function": {"name": name, "parameters": params}})


def test_grammars_by_tool_choice() -> None:
    tools = [_tool("a"), _tool("b")]
    assert request_grammar(None, tools, "auto", None) is None
    assert request_grammar(None, tools, "none", None) is None
    required = request_grammar(None, tools, "required", None) or ""
    assert "{0,1}" in required  # up to one call per tool
    assert "{0," not in (request_grammar(None, tools, "required", False) or "")
    named = request_grammar(
        None, tools, NamedToolChoice.model_validate({"type": "function", "function": {"name": "b"}}), None
    )
    assert named is not None and '"b"' in named and '"a"' not in named
    for g in (required, named):
        assert LLMatcher.validate_grammar_with_warnings(g) == (False, [])


def test_schemas_are_closed_unless_they_say_otherwise() -> None:
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {}}},
            "c": {"const": {"properties": {}}},
        },
        "$defs": {"D": {"properties": {"q": {}}}},
        "additionalProperties": True,
    }
    out = closed(schema)
    assert out["additionalProperties"] is True  # said so: kept
    assert out["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]  # a map of names, not a schema
    assert out["properties"]["c"] == {"const": {"properties": {}}}  # data, untouched
    assert out["$defs"]["D"]["additionalProperties"] is False
    assert closed({"type": "object"}) == {"type": "object"}  # any object stays any object


def test_a_schema_the_compiler_refuses_names_its_field() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    req = ChatCompletionRequest.model_validate(
        {**body, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}
    )
    with pytest.raises(GrammarError) as info:
        check_request_grammar(req.response_format, req.tools, "required", None)
    assert info.value.param == "tools[0].function.parameters"


def test_leading_system_messages_become_one_and_a_late_one_is_refused() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": "really"},
                {"role": "user", "content": "hi"},
            ],
        }
    )
    assert req.engine_messages() == [
        {"role": "system", "content": "be brief\n\nreally"},
        {"role": "user", "content": "hi"},
    ]
    with pytest.raises(ValueError, match="message 1 is a 'system' message"):
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}],
            }
        )
