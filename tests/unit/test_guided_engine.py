"""Per-row guidance in one engine call, in both engine modes, on the real tiny model (random
weights, so only constrained decoding can make its output valid): rows with different JSON
schemas, a forced tool call and plain rows share a call; each guided row ends by itself with
JSON that validates, each plain greedy row gives its solo text; logprobs are consistent;
vLLM's extensions (logit_bias, ignore_eos, min_tokens, min_p, repetition_penalty) act per row.

The model here can say EOS (unlike the suite's `demo_model`), so ends are real ends."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import jsonschema_rs
import pytest

from models.demo import build_demo_model
from schemas.openai import ChatCompletionRequest
from tests.unit.test_continuous_engine import _settings
from workers.engine import Engine, GenParams, GenRequest, GenResult
from workers.engines import load_engine
from workers.runner import build_completion, gen_requests

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "label": {"enum": ["spam", "ham", "eggs"]},
    },
    "required": ["name", "age", "label"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "where": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -5, "maximum": 5},
                "tag": {"type": "string", "maxLength": 4},
            },
            "required": ["x", "tag"],
            "additionalProperties": False,
        },
    },
    "required": ["ok", "where"],
    "additionalProperties": False,
}
LABEL = {
    "type": "object",
    "properties": {"label": {"enum": ["a", "b", "c"]}},
    "required": ["label"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


def _fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("plain") / "tiny-qwen2")


@pytest.fixture(scope="module")
def engines(plain_model: Path) -> Iterator[dict[str, Engine]]:
    loaded = {mode: load_engine(_settings(plain_model, mode, batch=8)) for mode in ("static", "continuous")}
    yield loaded
    cast(Any, loaded["continuous"]).shutdown()


def _request(content: str, **body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 200, **body}
    )


def _ok(outs: list[GenResult | Exception]) -> list[GenResult]:
    assert all(isinstance(o, GenResult) for o in outs), outs
    return [o for o in outs if isinstance(o, GenResult)]


MODES = ["static", "continuous"]


@pytest.mark.parametrize("mode", MODES)
def test_rows_with_different_schemas_and_plain_rows_share_a_call(
    engines: dict[str, Engine], mode: str
) -> None:
    engine = engines[mode]
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("person", {"response_format": _fmt(PERSON), "temperature": 0}),
        ("plain", {"temperature": 0, "max_tokens": 30}),
        ("nested", {"response_format": _fmt(NESTED), "temperature": 0.9, "seed": 3}),
        ("label", {"response_format": _fmt(LABEL), "temperature": 1.0}),
        (
            "tool",
            {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False, "temperature": 0},
        ),
        ("plain two", {"temperature": 0, "max_tokens": 17}),
        ("person again", {"response_format": _fmt(PERSON), "temperature": 0.7, "top_p": 0.9}),
    ]
    requests = [_request(c, **b) for c, b in bodies]
    rows = [r for req in requests for r in gen_requests(req, 200)]
    outs = _ok(engine.generate(rows))
    for req, out, (name, body) in zip(requests, outs, bodies, strict=True):
        choice = build_completion("job_x", "tiny", [out], req.calls_tools).choices[0]
        if "response_format" in body:
            assert out.finish_reason == "stop", (name, out)
            schema = body["response_format"]["json_schema"]["schema"]
            jsonschema_rs.validate(schema, json.loads(out.text))
        elif "tools" in body:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None, (name, out.text)
            calls = choice.message.tool_calls or []
            assert len(calls) == 1 and calls[0].function.name == "get_weather"
            jsonschema_rs.validate(WEATHER["function"]["parameters"], json.loads(calls[0].function.arguments))
    for k in (1, 5):  # plain greedy rows: the text they give alone
        alone = _ok(engine.generate([rows[k]]))[0]
        assert (alone.text, alone.completion_tokens) == (outs[k].text, outs[k].completion_tokens)


@pytest.mark.parametrize("mode", MODES)
def test_logprobs_are_one_per_token_and_consistent(engines: dict[str, Engine], mode: str) -> None:
    reqs = [
        _request("lp greedy", temperature=0, max_tokens=12, logprobs=True, top_logprobs=5),
        _request("lp hot", temperature=1.3, top_p=0.9, max_tokens=12, logprobs=True, top_logprobs=3, seed=5),
        _request("lp json", response_format=_fmt(LABEL), temperature=0, logprobs=True),
        _request("no lp", temperature=0, max_tokens=5),
    ]
    outs = _ok(engines[mode].generate([r for q in reqs for r in gen_requests(q, 50)]))
    for req, out in zip(reqs[:3], outs[:3], strict=True):
        assert out.logprobs is not None and len(out.logprobs) == out.completion_tokens > 0
        text = "".join(e["token"] for e in out.logprobs)
        assert text.startswith(out.text[:3]) or "\ufffd" in text
        for e in out.logprobs:
            assert e["logprob"] <= 0 and bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]
            assert len(e["top_logprobs"]) <= (req.top_logprobs or 0)
            ranked = [t["logprob"] for t in e["top_logprobs"]]
            assert ranked == sorted(ranked, reverse=True)
            same = [t for t in e["top_logprobs"] if t["bytes"] == e["bytes"]]
            if same:  # the chosen token's logprob is its entry among the alternatives
                assert same[0]["logprob"] == pytest.approx(e["logprob"])
    greedy = outs[0].logprobs or []
    assert all(e["top_logprobs"][0]["bytes"] == e["bytes"] for e in greedy)  # argmax is the top one
    assert outs[3].logprobs is None


def _eos(engine: Engine) -> int:
    return int(cast(Any, engine).stop_token_ids[0])


@pytest.mark.parametrize("mode", MODES)
def test_vllm_extensions_act_per_row(engines: dict[str, Engine], mode: str) -> None:
    engine = engines[mode]
    eos = _eos(engine)
    msg = [{"role": "user", "content": "extensions"}]

    def row(**kw: Any) -> GenRequest:
        return GenRequest(messages=msg, params=GenParams(**{"max_tokens": 20, "temperature": 0, **kw}))

    eos_now = ((eos, 100.0),)
    outs = _ok(
        engine.generate(
            [
                row(logit_bias=eos_now),  # ends at once
                row(logit_bias=eos_now, ignore_eos=True),  # runs to max_tokens
                row(logit_bias=eos_now, min_tokens=6),  # ends right after 6 tokens
                row(logit_bias=((65, 100.0),)),  # every token is 65
                row(),
                row(temperature=1.5, min_p=1.0, seed=1),  # min_p 1: only the most likely token
                row(repetition_penalty=3.0),
            ]
        )
    )
    assert outs[0].completion_tokens <= 1 and outs[0].finish_reason == "stop"
    assert outs[1].completion_tokens == 20 and outs[1].finish_reason == "length"
    assert 6 <= outs[2].completion_tokens <= 7 and outs[2].finish_reason == "stop"
    tok = cast(Any, engine).engine.tokenizer
    assert outs[3].text == tok.decode([65]) * 20
    assert outs[5].text == outs[4].text
    assert outs[6].text != outs[4].text
    # repetition_penalty counts the prompt and the output alike in both modes
    again = _ok(engine.generate([row(repetition_penalty=3.0)]))[0]
    assert again.text == outs[6].text
