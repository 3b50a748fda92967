import pytest
from pydantic import ValidationError

from schemas.jobs import TERMINAL, TRANSITIONS, JobStatus
from schemas.openai import ChatCompletionRequest
from workers.engine import truncate_at_stop

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_minimal_request_defaults() -> None:
    req = ChatCompletionRequest.model_validate(BASE)
    assert req.n == 1 and req.stop_list == [] and req.token_limit is None


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"tools": []}, "tools"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}, "response_format"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"store": True}, "store"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": None}]}, "messages"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
    ],
)
def test_bad_requests_name_the_field(patch: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({**BASE, **patch})
    assert field in str(info.value)


def test_developer_role_and_text_parts_reach_engine_as_text() -> None:
    req = ChatCompletionRequest.model_validate(
        {**BASE, "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}]}
    )
    assert req.messages[0].for_engine() == {"role": "system", "content": "be brief"}


def test_state_machine_terminal_states_are_final() -> None:
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()
    assert JobStatus.RUNNING in TRANSITIONS[JobStatus.RUNNING]  # redelivery after a crash
    assert JobStatus.SUCCEEDED not in TRANSITIONS[JobStatus.QUEUED]


def test_truncate_at_stop_cuts_at_earliest() -> None:
    assert truncate_at_stop("abc STOP def END", ["END", "STOP"]) == ("abc ", True)
    assert truncate_at_stop("abc", ["x"]) == ("abc", False)


def test_image_and_audio_parts_get_a_text_only_error_naming_the_part() -> None:
    for kind in ("image_url", "input_audio"):
        body = {
            "model": "m",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": kind, kind: {}}]}
            ],
        }
        with pytest.raises(ValidationError) as err:
            ChatCompletionRequest.model_validate(body)
        assert f"this model accepts text only: content part 1 is of type '{kind}'" in str(err.value)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}, "messages"),
        ({"stop": ["ok", "\ud800"]}, "stop"),
        ({"metadata": {"run": "\udc00"}}, "metadata"),
        ({"user": "\ud83d"}, "user"),
    ],
)
def test_text_that_is_not_unicode_is_refused_naming_the_field(patch: dict, field: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **patch}
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate(body)
    text = str(err.value)  # ours, or pydantic's own for a length-checked string
    assert ("lone surrogate" in text or "unicode" in text) and err.value.errors()[0]["loc"][0] == field


def test_a_surrogate_pair_is_an_emoji_not_an_error() -> None:
    parsed = __import__("json").loads('{"content": "\\ud83d\\ude00 hi"}')  # as JSON: one character
    ok = {"model": "m", "messages": [{"role": "user", **parsed}]}
    assert ChatCompletionRequest.model_validate(ok).messages[0].text() == "\U0001f600 hi"
