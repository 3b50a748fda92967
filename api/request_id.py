"""Every response carries `x-request-id`: the client's own `X-Request-Id` when it sent a sane
one, else a fresh `req_<hex>` (OpenAI's form; its SDK shows it as `_request_id`). A user
reporting a failure can quote it, and the API's log lines for the request name it.

Pure ASGI (not BaseHTTPMiddleware): it must not buffer streaming responses. It wraps the whole
middleware stack, Starlette's ServerErrorMiddleware included, so a 500 carries the id too: a
500 is the answer whose id matters most."""

from __future__ import annotations

import re
import uuid

from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
#: what a client may choose: an id, not a place to smuggle text into our logs and headers
_SANE = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")


def client_id(scope: Scope) -> str | None:
    """The client's X-Request-Id, if it sent exactly one that looks like an id."""
    sent = [v for k, v in scope.get("headers", []) if k.lower() == HEADER]
    if len(sent) != 1:
        return None
    value = sent[0].decode("latin-1")
    return value if _SANE.fullmatch(value) else None


def request_id(request: Request) -> str:
    """The id of this request ("" outside the middleware, e.g. in a test app without it)."""
    return str(request.scope.get("state", {}).get("request_id", ""))


class RequestId:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = client_id(scope) or f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode())]}
            await send(message)

        await self.app(scope, receive, tagged)


def install(app: FastAPI) -> None:
    """Wraps the app's middleware stack when Starlette builds it (on the first request), outside
    ServerErrorMiddleware, which `add_middleware` cannot reach."""
    build = app.build_middleware_stack

    def build_with_id() -> ASGIApp:
        return RequestId(build())

    app.build_middleware_stack = build_with_id  # type: ignore[method-assign]
