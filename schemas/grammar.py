"""The grammar a request's output must follow, built from `response_format`, `tools` and
`tool_choice`: one llguidance grammar (Lark with embedded JSON schemas) per request.

Why llguidance (and not xgrammar): both fit our per-row hooks, but xgrammar 0.2 requires
triton (a 285 MB wheel) on Linux even on a CPU-only machine, and compiles a grammar against
the vocabulary up front; llguidance is a 3 MB wheel with no dependencies, builds a matcher
in well under a millisecond for the schemas clients send, and computes each row's mask
lazily (measured in docs/benchmarks.md, `inferq bench structured`). It is also what
OpenAI's own structured outputs run on.

Why the grammar text is built here, in plain Python: the API refuses a schema the compiler
cannot take with a 400 before the job is queued, and the worker builds the same text for
its matcher; both need it without torch.

Objects that list their properties take no others unless the schema says so (`closed`).

Whitespace: between JSON tokens it is fixed (", " and ": ", no newlines), because a random
or weak model given free whitespace may pad forever; a schema whose strings have
`maxLength` and whose numbers are bounded therefore always ends.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from llguidance import LLMatcher

from schemas.structured import JsonObjectFormat, JsonSchemaFormat, NamedToolChoice, Tool

#: llguidance's JSON options: compact, bounded whitespace
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: the hermes tool-call format (Qwen2.5, Qwen3, ...): what ms-swift's agent template renders
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"


class GrammarError(ValueError):
    """A schema the grammar compiler cannot take; `param` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


#: keywords whose value maps names to schemas, and keywords whose value is data
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_VALUES = ("const", "enum", "default", "examples")


def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties and says nothing of others
    closed to others (`additionalProperties: false`), as xgrammar's strict mode (vLLM's
    default) reads schemas. Why: clients send tool and response schemas without it
    (LangChain, instructor, pydantic's own), and a model given room for more keys, a weak or
    random one, adds keys until max_tokens and the answer is lost."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _VALUES else closed(value)
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _json_rule(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**closed(schema), "x-guidance": JSON_OPTIONS})


def _lark(text: str) -> str:
    return str(LLMatcher.grammar_from_lark(text))


def response_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema of `response_format` (any object for JSON mode), None for text."""
    if isinstance(response_format, JsonObjectFormat):
        return {"type": "object"}
    if isinstance(response_format, JsonSchemaFormat):
        return response_format.json_schema.json_schema or {"type": "object"}
    return None


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """One call's JSON as the hermes format writes it: a function's name and arguments that
    match its parameters."""
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _calls_rules(tools: list[Tool], parallel: bool) -> str:
    """One call, or with parallel calls up to one per tool offered: a model that keeps
    calling (a weak or random one never picks the end over another call) cannot run to
    max_tokens and lose every call; an agent gets further calls on its next turn."""
    repeat = f' ("\\n" call){{0,{len(tools) - 1}}}' if parallel and len(tools) > 1 else ""
    return (
        f"calls: call{repeat}\n"
        f"call: {json.dumps(CALL_OPEN)} call_body {json.dumps(CALL_CLOSE)}\n"
        f"call_body: {_json_rule(call_schema(tools))}\n"
    )


def request_grammar(
    response_format: Any,
    tools: list[Tool] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
) -> str | None:
    """The grammar text for a matcher, None when the output is free text.

    - `tool_choice` "required": one call, or up to one per tool with parallel calls (the
      default); a named function: exactly one call of it;
    - "auto" with a response format: a call or an answer in that format;
    - a response format alone: JSON (of the schema)."""
    schema = response_schema(response_format)
    offered = tools if tools and tool_choice != "none" else []
    if offered and (tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)):
        if isinstance(tool_choice, NamedToolChoice):
            chosen = [t for t in offered if t.function.name == tool_choice.function.name]
            return _lark("start: calls\n" + _calls_rules(chosen, parallel=False))
        return _lark("start: calls\n" + _calls_rules(offered, parallel_tool_calls is not False))
    if offered and schema is not None:
        rules = _calls_rules(offered, parallel_tool_calls is not False)
        return _lark(f"start: calls | answer\nanswer: {_json_rule(schema)}\n{rules}")
    if schema is not None:
        return _lark(f"start: {_json_rule(schema)}\n")
    return None


@functools.lru_cache(maxsize=1024)
def _problem(grammar: str) -> str | None:
    """Why the grammar cannot be used, or None; cached by its text: a batch of 10,000 lines
    with one schema pays the check (about 2 ms) once."""
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    return "; ".join(messages) if is_error else None


def check_request_grammar(
    response_format: Any, tools: list[Tool] | None, tool_choice: Any, parallel_tool_calls: bool | None
) -> None:
    """Raise `GrammarError` naming the field whose schema the compiler cannot take."""
    schema = response_schema(response_format)
    if schema is not None and (why := _problem(_lark(f"start: {_json_rule(schema)}\n"))):
        raise GrammarError("response_format", f"the JSON schema cannot be used: {why}")
    for i, tool in enumerate(tools or []):
        if tool.function.parameters is not None and (
            why := _problem(_lark(f"start: {_json_rule(tool.function.parameters)}\n"))
        ):
            raise GrammarError(f"tools[{i}].function.parameters", f"the JSON schema cannot be used: {why}")
    grammar = request_grammar(response_format, tools, tool_choice, parallel_tool_calls)
    if grammar is not None and (why := _problem(grammar)):
        raise GrammarError("response_format" if schema is not None else "tools", why)
