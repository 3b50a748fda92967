"""Request guard (pure ASGI): content type and body size, checked before any route runs.

Why not only Content-Length: a chunked request has none, and FastAPI would read it all into
memory; counting the bytes as they arrive stops it at the limit."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import CodedHTTPException
from core.config import Settings
from schemas.openai import error_body

_UPLOAD_PATHS = ("/v1/files",)


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        upload = path in _UPLOAD_PATHS
        limit = self.settings.max_file_bytes + (1 << 20) if upload else self.settings.max_body_bytes
        ctype = headers.get("content-type", "")
        if not upload and ctype and not ctype.split(";")[0].strip().endswith("json"):
            await _reply(
                send, 415, f"Content-Type must be application/json, not '{ctype}'.", "unsupported_media_type"
            )
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await _reply(
                send, 413, f"Request body of {length} bytes is over the limit of {limit}.", "body_too_large"
            )
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise CodedHTTPException(
                        413, f"Request body is over the limit of {limit} bytes.", "body_too_large"
                    )
            return message

        await self.app(scope, counted, send)


async def _reply(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", None, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
