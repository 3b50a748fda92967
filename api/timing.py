"""Every response says how long the API took to start answering (`Server-Timing` and the
article's `X-Process-Time`), so a client can tell queue and network time from ours.

Pure ASGI (not BaseHTTPMiddleware): it must not buffer streaming responses."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class TimingHeader:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = time.perf_counter() - t0
                headers = list(message.get("headers", []))
                headers += [
                    (b"server-timing", f"app;dur={elapsed * 1000:.2f}".encode()),
                    (b"x-process-time", f"{elapsed:.6f}".encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed)
