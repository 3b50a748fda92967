"""One error shape for every route (OpenAI's), and the handlers that produce it.

Why: clients written against OpenAI read `error.message` and `error.param`; a bare
FastAPI 422 or a 500 traceback helps nobody. Broker/store outages answer 503, never 500.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        # pydantic puts union-member names in the location; they are noise to a client
        if isinstance(p, str) and ("[" in p or p in {"str", "list", "function-after"}):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    err = exc.errors()[0]
    param = _loc_to_param(tuple(err.get("loc", ())))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
    if kind == "json_invalid":
        return (
            "Request body is not valid JSON: " + str(err.get("ctx", {}).get("error", "")),
            None,
            "invalid_json",
        )
    if kind == "missing" and param == "body":
        return (
            "Request body is missing or is not JSON (send Content-Type: application/json)",
            None,
            "invalid_body",
        )
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"Invalid value for '{param}': {msg}", param, "invalid_value"


def install(app: FastAPI) -> None:
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
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = getattr(exc, "code", None)
        return JSONResponse(error_body(str(exc.detail), kind, None, code), status_code=exc.status_code)

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
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error: %s", exc)
        return JSONResponse(error_body("Internal server error", "server_error"), status_code=500)
