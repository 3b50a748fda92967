"""How a refused request is worded (`api.errors.validation_message`), on FastAPI's own
RequestValidationError from a small strict model (not the chat request's, whose fields change),
and the request id on answers the routes never see (a 500)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from api.errors import OPENAI_CHAT_FIELDS, validation_message
from api.main import create_app
from core.config import Settings


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message]
    temperature: float = 1.0

    @model_validator(mode="after")
    def _whole(self) -> Request:
        if self.model == "both":
            raise ValueError("model 'both' needs two messages")
        return self


def _refusal(body: Any) -> tuple[str, str | None, str]:
    """validation_message of `body` as FastAPI reports it (its errors under "body")."""
    try:
        Request.model_validate(body)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
        return validation_message(RequestValidationError(errors, body=body))
    raise AssertionError("the body was valid")


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_every_extra_field_is_named_at_once() -> None:
    message, param, code = _refusal(_body(colour="red", flavour="sweet", size=3))
    assert param == "colour" and code == "unknown_parameter"
    assert message == "Unrecognized request arguments supplied: colour, flavour, size"


def test_openai_fields_are_unsupported_not_unknown() -> None:
    message, param, code = _refusal(_body(audio={"voice": "alloy"}, web_search_options={}))
    assert param == "audio" and code == "unsupported_parameter"
    assert message == "audio, web_search_options are not supported by this server"
    one = _refusal(_body(reasoning_effort="low"))
    assert one == (
        "reasoning_effort is not supported by this server",
        "reasoning_effort",
        "unsupported_parameter",
    )


def test_mixed_extras_list_both_kinds_and_param_is_the_first() -> None:
    message, param, code = _refusal(_body(prediction={}, colour="red", functions=[]))
    assert param == "prediction" and code == "unsupported_parameter"
    assert message == (
        "Unrecognized request argument supplied: colour; "
        "prediction, functions are not supported by this server"
    )
    _, param, code = _refusal(_body(colour="red", verbosity="low"))
    assert (param, code) == ("colour", "unknown_parameter")


def test_nested_extras_are_named_by_path() -> None:
    body = _body(messages=[{"role": "user", "content": "hi", "name": "bob", "mood": "glad"}])
    message, param, code = _refusal(body)
    assert (param, code) == ("messages[0].name", "unsupported_parameter")
    assert message == (
        "Unrecognized request argument supplied: messages[0].mood; "
        "messages[0].name is not supported by this server"
    )


def test_extras_come_before_other_errors() -> None:
    message, param, _ = _refusal(_body(temperature="hot", colour="red"))
    assert param == "colour" and "temperature" not in message


def test_field_errors_keep_their_wording() -> None:
    assert _refusal(_body(temperature="hot")) == (
        "Invalid value for 'temperature': Input should be a valid number, unable to parse string as a number",
        "temperature",
        "invalid_value",
    )
    message, param, code = _refusal({"messages": []})
    assert (message, param, code) == ("Invalid value for 'model': Field required", "model", "invalid_value")


def test_a_model_level_error_names_no_field() -> None:
    assert _refusal(_body(model="both")) == (
        "Invalid request: model 'both' needs two messages",
        None,
        "invalid_value",
    )


def test_missing_and_invalid_json_bodies() -> None:
    missing = RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    assert validation_message(missing)[1:] == (None, "invalid_body")
    broken = RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error", "ctx": {"error": "oops"}}]
    )
    assert validation_message(broken) == ("Request body is not valid JSON: oops", None, "invalid_json")


def test_the_openai_field_set_covers_the_sdk() -> None:
    """The set was taken from the SDK's CreateChatCompletionRequest; a newer SDK may add fields."""
    from openai.types.chat import completion_create_params

    sdk = set(completion_create_params.CompletionCreateParamsBase.__annotations__)
    assert sdk <= OPENAI_CHAT_FIELDS, sorted(sdk - OPENAI_CHAT_FIELDS)


@pytest.fixture()
def failing_app() -> FastAPI:
    """The real app (its store never reached) with one route that fails as a bug would."""
    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


async def test_a_500_carries_the_request_id(failing_app: FastAPI, caplog: pytest.LogCaptureFixture) -> None:
    transport = httpx.ASGITransport(app=failing_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        resp = await c.get("/boom", headers={"X-Request-Id": "trace-500"})
        fresh = await c.get("/boom")
    assert resp.status_code == 500 and json.loads(resp.text)["error"]["type"] == "server_error"
    assert resp.headers["x-request-id"] == "trace-500"
    assert fresh.headers["x-request-id"].startswith("req_")
    assert "request trace-500" in caplog.text
