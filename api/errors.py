"""One error shape for every route (OpenAI's), and the handlers that produce it.

Why: clients written against OpenAI read `error.message` and `error.param`; a bare
FastAPI 422 or a 500 traceback helps nobody. Broker/store outages answer 503, never 500.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketClose

from api.request_id import request_id
from schemas.openai import ErrorResponse, error_body

logger = logging.getLogger(__name__)


class CodedHTTPException(StarletteHTTPException):
    """An HTTP error with an OpenAI error `code`. An HTTPException, because FastAPI turns any
    other exception raised while it reads a body into a 400 "error parsing the body"."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status, message)
        self.code = code


class APIError(Exception):
    """Raised by service code; turned into an OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = headers


_MEANINGS: dict[int, str] = {
    400: "Invalid request: `error.param` names the field",
    401: "Missing or unknown API key (when the server has keys)",
    403: "The key may not do this (an admin key is needed)",
    404: "No such object, or it belongs to another key",
    409: "The object's state does not allow this (already finished, cancelled)",
    413: "Body over the size limit; the message gives the limit",
    415: "Content-Type is not application/json",
    429: "Rate limit or the key's active-job limit reached; see Retry-After",
    500: "The generation failed on the worker",
    503: "Job store unavailable, or no worker has loaded the model yet; see Retry-After",
    504: "No worker acted on it in time; the request stays in force",
}
_EVERY_ROUTE = (401, 429, 503)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a /v1 route: the errors it can answer, each with the one
    error body, so generated clients and /docs show them. 401, 429 and 503 come with every
    route (auth, rate limit and the store sit in front of all of them)."""
    codes = sorted(set(statuses) | set(_EVERY_ROUTE))
    return {code: {"model": ErrorResponse, "description": _MEANINGS[code]} for code in codes}


#: The fields of OpenAI's CreateChatCompletionRequest (openai-python 3.57's
#: `completion_create_params`, generated from OpenAI's spec). A refused field in this set is one
#: a client may rightly send to OpenAI, so it hears "not supported by this server", not that it
#: sent something nobody knows. Fields this server accepts are here too: whether one is refused
#: is for the request model to say; this set only chooses the words.
OPENAI_CHAT_FIELDS = frozenset(
    {
        "audio",
        "frequency_penalty",
        "function_call",
        "functions",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "messages",
        "metadata",
        "modalities",
        "model",
        "moderation",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning_effort",
        "response_format",
        "safety_identifier",
        "seed",
        "service_tier",
        "stop",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
        "verbosity",
        "web_search_options",
    }
)
#: The fields of OpenAI's chat messages (every role's, together), for `messages[i].<field>`.
OPENAI_MESSAGE_FIELDS = frozenset(
    {"audio", "content", "function_call", "name", "refusal", "role", "tool_call_id", "tool_calls"}
)
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
_MESSAGE_FIELD = re.compile(r"messages\[\d+\]\.(\w+)")


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """The field as a client writes it (`messages[0].content`); None when the error is about
    the body as a whole (a model-level validator, a body that is missing or not an object)."""
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        # pydantic puts union-member names in the location; they are noise to a client
        if isinstance(p, str) and ("[" in p or p in {"str", "list", "function-after"}):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def is_openai_field(param: str) -> bool:
    """Whether OpenAI's chat-completion request defines this (top-level or message) field."""
    if param in OPENAI_CHAT_FIELDS:
        return True
    nested = _MESSAGE_FIELD.fullmatch(param)
    return nested is not None and nested.group(1) in OPENAI_MESSAGE_FIELDS


def _refused_fields(params: list[str]) -> tuple[str, str | None, str]:
    """One answer for every field the request may not have: a client that sent three learns of
    all three at once, not one per round trip. Fields of OpenAI's API are "not supported"
    (`unsupported_parameter`); anything else is "unrecognized" (`unknown_parameter`), as
    OpenAI says of fields it does not know. `param` and `code` are the first field's."""
    unsupported = [p for p in params if is_openai_field(p)]
    unknown = [p for p in params if not is_openai_field(p)]
    parts = []
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        parts.append(f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}")
    if unsupported:
        verb = "are" if len(unsupported) > 1 else "is"
        parts.append(f"{', '.join(unsupported)} {verb} not supported by this server")
    code = "unsupported_parameter" if is_openai_field(params[0]) else "unknown_parameter"
    return "; ".join(parts), params[0], code


def validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) of a request FastAPI could not validate. Extra fields come first,
    all of them; otherwise the first error speaks for the request."""
    errors = exc.errors()
    extras = [_loc_to_param(tuple(e.get("loc", ()))) for e in errors if e.get("type") == "extra_forbidden"]
    named = [p for p in extras if p is not None]
    if named:
        return _refused_fields(named)
    err = errors[0]
    param = _loc_to_param(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return (
            "Request body is not valid JSON: " + str(err.get("ctx", {}).get("error", "")),
            None,
            "invalid_json",
        )
    if kind == "missing" and param is None:
        return (
            "Request body is missing or is not JSON (send Content-Type: application/json)",
            None,
            "invalid_body",
        )
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None:  # a model-level validator: about the request as a whole, no one field
        return f"Invalid request: {msg}", None, "invalid_value"
    return f"Invalid value for '{param}': {msg}", param, "invalid_value"


class UnknownEndpoint:
    """The router's answer when no route matches: a 404 in OpenAI's shape that says which
    endpoints this server does serve, so a client pointed at us for /v1/completions or
    /v1/embeddings learns at once that it needs another server, not that something is
    "Not Found". The router uses it only when no path matches; a route's own 404 (no such job)
    is untouched."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def served(self) -> list[str]:
        return sorted([*self.app.openapi()["paths"], "/docs"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # a websocket: nothing here speaks it
            await WebSocketClose()(scope, receive, send)
            return
        asked = f"{scope['method']} {scope['path'][:200]}"
        message = f"This server serves {', '.join(self.served())}; {asked} is not one of them (see /docs)."
        body = error_body(message, "invalid_request_error", None, "unknown_endpoint")
        await JSONResponse(body, status_code=404)(scope, receive, send)


def _allowed(request: Request, exc: StarletteHTTPException) -> str:
    """Every method the path takes. Starlette's Allow names only the first route that matched the
    path (GET /v1/jobs and POST /v1/jobs are two routes), so the OpenAPI paths say it."""
    path = getattr(request.scope.get("route"), "path", None)
    documented = request.app.openapi()["paths"].get(path, {})
    methods = [m.upper() for m in documented if m.upper() in _METHODS]
    return ", ".join(methods) or (exc.headers or {}).get("Allow", "")


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """A 405 says which methods the path takes, in its message and its Allow header."""
    code = getattr(exc, "code", None)
    message = str(exc.detail)
    headers = exc.headers
    if exc.status_code == 405:
        allowed = _allowed(request, exc)
        message = f"{request.method} is not allowed on {request.url.path[:200]}; it takes {allowed}."
        code = "method_not_allowed"
        headers = {**(headers or {}), "Allow": allowed}
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(message, kind, None, code), status_code=exc.status_code, headers=headers)


def install(app: FastAPI) -> None:
    app.router.default = UnknownEndpoint(app)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.type, exc.param, exc.code),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _http_error(request, exc)

    @app.exception_handler(redis.exceptions.RedisError)
    async def _redis_down(_: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        logger.warning("state store unavailable: %s", exc)
        return JSONResponse(
            error_body(
                "The job store is unavailable; retry shortly.",
                "service_unavailable",
                None,
                "store_unavailable",
            ),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error (request %s): %s", request_id(request), exc)
        return JSONResponse(error_body("Internal server error", "server_error"), status_code=500)
