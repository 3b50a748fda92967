"""Black-box tests with the client libraries people point at an OpenAI-compatible server:
the openai SDK, langchain-openai, litellm and instructor, each asked for structured output
(response_format json_schema / json_object, tools and tool_choice) from the stack's model.

The stack serves a RANDOM tiny model, so an answer that validates can only come from
constrained decoding: every schema here is small and bounded (strings of at most 8
characters, an enum of 3 labels, an integer 0..100) so that a constrained random model ends
well within `max_tokens`.

`captured_requests.json` holds the exact bodies these clients sent (FINDINGS.md says how
they were captured); the replay test posts each one and expects 200.

instructor pins its own openai, so it runs in a venv of its own through
`instructor_check.py`: INFERQ_INSTRUCTOR_PYTHON names its python, else
`.venv-instructor/bin/python` at the repository root is used, made on first use (20-60 s
from the local package index; keep `.venv-instructor/` in .gitignore).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from tests.support import ROOT, procs

# litellm 1.110 imports a module on its first completion() whose TypedDict pydantic warns about
pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly.*qualifier:UserWarning")

HERE = Path(__file__).resolve().parent
MODEL = "tiny"
LIMIT = 200
CAPTURED = json.loads((HERE / "captured_requests.json").read_text())["requests"]

# litellm fetches a model price list from the internet (on its first call) unless told not to
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class Verdict(BaseModel):
    """A sentiment verdict."""

    label: Literal["pos", "neg", "neutral"]
    score: int = Field(ge=0, le=100)
    word: str = Field(max_length=8, description="one short word")


class GetWeather(BaseModel):
    """Get the weather for a city."""

    city: str = Field(max_length=8)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["utc", "cet", "pst"]}},
            "required": ["zone"],
        },
    },
}
MESSAGES = [{"role": "user", "content": "Judge the review 'I love it'."}]


@pytest.fixture(scope="module")
def base_url(stack: Any) -> str:
    return f"{stack.base_url}/v1"


# ------------------------------------------------------------------------ openai SDK
@pytest.fixture(scope="module")
def oai(base_url: str) -> Any:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120) as client:
        yield client


def test_openai_parse_response_format(oai: Any) -> None:
    """`parse()` sends json_schema with strict: true and raises on finish_reason "length"."""
    r = oai.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Verdict, max_tokens=LIMIT, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Verdict), choice.message.content
    assert Verdict.model_validate_json(choice.message.content) == choice.message.parsed


def test_openai_stream_response_format(oai: Any) -> None:
    """The streaming helper parses the concatenated deltas at the end."""
    with oai.chat.completions.stream(
        model=MODEL, messages=MESSAGES, response_format=Verdict, max_tokens=LIMIT, temperature=0
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Verdict), final.choices[0].message.content


def test_openai_parse_strict_tool(oai: Any) -> None:
    openai = pytest.importorskip("openai")
    r = oai.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required",
        max_tokens=LIMIT,
        temperature=0,
    )
    calls = r.choices[0].message.tool_calls
    assert calls, r.choices[0].message.content
    assert calls[0].function.name == "GetWeather"
    assert isinstance(calls[0].function.parsed_arguments, GetWeather)


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_openai_tools_then_round_trip(oai: Any, tool_choice: Any) -> None:
    """A forced call fits its function's schema; sending it back (the SDK's message object,
    content null) with the tool's answer is accepted."""
    r = oai.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=LIMIT,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("tool_calls", "stop")
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1, choice.message.content
    call = calls[0]
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert GetWeather.model_validate(args)
    else:
        assert call.function.name == "get_time"
        assert args["zone"] in ("utc", "cet", "pst")
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_time"
    again = oai.chat.completions.create(
        model=MODEL,
        messages=[*MESSAGES, choice.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        max_tokens=16,
    )
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_openai_logprobs(oai: Any) -> None:
    r = oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3, max_tokens=8, temperature=0
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)


# ------------------------------------------------------------------------ langchain-openai
@pytest.fixture(scope="module")
def chat(base_url: str) -> Any:
    lc = pytest.importorskip("langchain_openai")
    return lc.ChatOpenAI(
        base_url=base_url,
        api_key="x",
        model=MODEL,
        temperature=0,
        max_tokens=LIMIT,
        max_retries=0,
        timeout=120,
    )


@pytest.mark.parametrize("method", [None, "json_schema", "function_calling"])
def test_langchain_with_structured_output(chat: Any, method: str | None) -> None:
    """None: langchain's default (json_schema in langchain-openai 1.x). function_calling
    returns None, not an error, when the answer has no usable tool call: include_raw shows
    why."""
    kw = {} if method is None else {"method": method}
    out = chat.with_structured_output(Verdict, include_raw=True, **kw).invoke("Judge the review 'I love it'.")
    assert out["parsing_error"] is None, out["raw"]
    assert isinstance(out["parsed"], Verdict), out["raw"]


@pytest.mark.parametrize("tool_choice", ["any", "GetWeather"])
def test_langchain_bind_tools(chat: Any, tool_choice: str) -> None:
    """ "any" goes out as "required", a name as the named-function shape. (With langchain's
    default, no tool_choice, a random model just talks.)"""
    ai = chat.bind_tools([GetWeather], tool_choice=tool_choice).invoke("Weather in Oslo?")
    assert not ai.invalid_tool_calls, ai.invalid_tool_calls
    assert ai.tool_calls, ai
    assert ai.tool_calls[0]["name"] == "GetWeather"
    assert GetWeather.model_validate(ai.tool_calls[0]["args"])


def test_langchain_tool_round_trip(chat: Any) -> None:
    """langchain sends an AIMessage with tool calls as content null, then the ToolMessage."""
    lc_messages = pytest.importorskip("langchain_core.messages")
    ai = chat.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Oslo?")
    assert ai.tool_calls, ai
    answer = chat.bind_tools([GetWeather]).invoke(
        [
            lc_messages.HumanMessage("Weather in Oslo?"),
            ai,
            lc_messages.ToolMessage(content="sunny", tool_call_id=ai.tool_calls[0]["id"]),
        ],
        max_tokens=16,
    )
    assert isinstance(answer.content, str)


# ------------------------------------------------------------------------ litellm
@pytest.fixture(scope="module")
def litellm(base_url: str) -> Any:
    mod = pytest.importorskip("litellm")
    mod.telemetry = False
    mod.suppress_debug_info = True
    return mod


def _litellm_kw(base_url: str) -> dict[str, Any]:
    return dict(
        model=f"openai/{MODEL}",
        api_base=base_url,
        api_key="x",
        max_tokens=LIMIT,
        temperature=0,
        num_retries=0,
    )


@pytest.mark.parametrize("form", ["pydantic", "json_schema_dict"])
def test_litellm_response_format(litellm: Any, base_url: str, form: str) -> None:
    """litellm turns a pydantic class into json_schema with strict: true and does NOT
    validate the answer itself: the content must fit."""
    if form == "pydantic":
        rf: Any = Verdict
    else:
        rf = {
            "type": "json_schema",
            "json_schema": {"name": "Verdict", "schema": Verdict.model_json_schema()},
        }
    r = litellm.completion(messages=MESSAGES, response_format=rf, **_litellm_kw(base_url))
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(Verdict.model_validate_json(choice.message.content), Verdict)


def test_litellm_tools(litellm: Any, base_url: str) -> None:
    r = litellm.completion(
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        **_litellm_kw(base_url),
    )
    calls = r.choices[0].message.tool_calls
    assert calls, r.choices[0].message.content
    assert calls[0].function.name == "get_weather"
    assert GetWeather.model_validate_json(calls[0].function.arguments)


# ------------------------------------------------------------------------ instructor
def ensure_instructor_python(venv: Path) -> Path:
    """The python of a venv with instructor, made by scripts/instructor-venv if it has none.

    scripts/test makes it before pytest (and names it in INFERQ_INSTRUCTOR_PYTHON), so only a
    bare `pytest` run pays the install inside a test's timeout.
    """
    proc = procs.run(
        [ROOT / "scripts" / "instructor-venv", str(venv)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def instructor_python() -> Path:
    named = os.environ.get("INFERQ_INSTRUCTOR_PYTHON")
    if named:
        return Path(named)
    return ensure_instructor_python(ROOT / ".venv-instructor")


def instructor_verdict(python: Path, base_url: str, mode: str) -> dict[str, Any]:
    proc = procs.run(
        [python, HERE / "instructor_check.py", base_url, mode, MODEL],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_validated(instructor_python: Path, base_url: str, mode: str) -> None:
    """TOOLS: a named tool_choice, the object read from tool_calls[0].function.arguments;
    JSON_SCHEMA: response_format json_schema (no `strict`), the object read from content.
    One attempt (max_retries=0): a finish_reason "length" raises IncompleteOutputException."""
    v = instructor_verdict(instructor_python, base_url, mode)
    assert v["ok"], v
    assert Verdict.model_validate(v["object"])
    assert v["requests"] == 1


def test_instructor_json_mode(instructor_python: Path, base_url: str) -> None:
    """Mode.JSON sends response_format json_object and puts the schema in a system message
    only: the server can force *a* JSON object but not *this* one, so a random model's object
    validates only by chance. What must hold: the request is accepted and, when the answer
    ended by itself, its content is one bare JSON object (instructor parses content as
    JSON, without stripping text or code fences)."""
    v = instructor_verdict(instructor_python, base_url, "JSON")
    assert v.get("last_status") == 200, v
    if v["ok"]:
        assert Verdict.model_validate(v["object"])
    elif v["finish_reason"] == "stop":
        assert isinstance(json.loads(v["content"]), dict), v
    else:
        assert v["finish_reason"] == "length", v
        assert v["content"].lstrip().startswith("{"), v


def test_instructor_md_json_accepted(instructor_python: Path, base_url: str) -> None:
    """Mode.MD_JSON sends no response_format (the format is asked for in the prompt): a random
    model cannot satisfy it; the request must still be accepted."""
    v = instructor_verdict(instructor_python, base_url, "MD_JSON")
    assert v.get("last_status") == 200, v


# ------------------------------------------------------------------------ replay
@pytest.mark.parametrize("captured", CAPTURED, ids=[c["name"] for c in CAPTURED])
def test_replay_captured_body(base_url: str, captured: dict[str, Any]) -> None:
    """Every field a mainstream client sends is accepted (a strict server refuses unknown
    fields with a 400). A body with no token limit gets a small one, nothing else changes."""
    body = dict(captured["body"])
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 16
    headers = {"authorization": "Bearer x", "user-agent": captured["user_agent"]}
    with httpx.Client(timeout=120) as client:
        if body.get("stream"):
            with client.stream("POST", f"{base_url}/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    r.read()
                assert r.status_code == 200, r.text
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            for line in lines[:-1]:
                assert json.loads(line[len("data: ") :])["object"] == "chat.completion.chunk"
        else:
            r = client.post(f"{base_url}/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["object"] == "chat.completion"
