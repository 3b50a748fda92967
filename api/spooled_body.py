"""A request body read once, ahead of the app: spooled (memory, then disk), fingerprinted as
it arrives, then handed to the app as the same bytes.

Why: an `Idempotency-Key` must be checked against the body before the route runs, and an
upload to /v1/files may be 200 MB, so the body can neither be held in memory nor read twice
from the client. The fingerprint of a multipart body leaves out its boundary: a client picks a
fresh random one per request, so a retry of the same upload would otherwise never match."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from tempfile import SpooledTemporaryFile
from typing import IO

from starlette.types import Message, Receive, Scope

#: bodies up to this stay in memory; larger ones (uploads) go to a temporary file
SPOOL_MEMORY = 1 << 20
#: bytes per message when the body is handed to the app
CHUNK = 1 << 16
#: what a multipart boundary is replaced with in the fingerprint
_BOUNDARY_TOKEN = b"--<boundary>"


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is nobody to answer."""


def header(scope: Scope, name: bytes) -> str:
    """The first value of a request header ("" without one)."""
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return ""


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a `multipart/*` content type (b"" for anything else)."""
    kind, *params = content_type.split(";")
    if not kind.strip().lower().startswith("multipart/"):
        return b""
    for param in params:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary" and value:
            return value.strip().strip('"').encode("latin-1")
    return b""


class Fingerprint:
    """SHA-256 of the method, path, query and body, fed chunk by chunk. In a multipart body
    every `--<boundary>` counts as one fixed token; a delimiter split across two chunks is
    found because the last `len(delimiter) - 1` bytes wait for the next chunk."""

    def __init__(self, scope: Scope) -> None:
        self._hash = hashlib.sha256()
        for part in (scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1")):
            self._hash.update(part.encode() + b"\0")
        boundary = multipart_boundary(header(scope, b"content-type"))
        self._delimiter = b"--" + boundary if boundary else b""
        self._tail = b""

    def update(self, chunk: bytes) -> None:
        if not self._delimiter:
            self._hash.update(chunk)
            return
        *whole, last = (self._tail + chunk).split(self._delimiter)
        for part in whole:
            self._hash.update(part + _BOUNDARY_TOKEN)
        keep = min(len(last), len(self._delimiter) - 1)
        self._hash.update(last[: len(last) - keep])
        self._tail = last[len(last) - keep :]

    def hexdigest(self) -> str:
        self._hash.update(self._tail)
        self._tail = b""
        return self._hash.hexdigest()


async def read_body(scope: Scope, receive: Receive) -> tuple[IO[bytes], int, str]:
    """(the spooled body, its size, its fingerprint). Errors raised by `receive` (the request
    guard's 413) propagate, the spool closed; a disconnect raises ClientGone."""
    spool: IO[bytes] = SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115 (closed by the caller)
    fingerprint = Fingerprint(scope)
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            spool.write(chunk)
            fingerprint.update(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                return spool, size, fingerprint.hexdigest()
    except BaseException:
        spool.close()
        raise


class Replay:
    """The app's `receive`: the spooled body in CHUNK-sized messages, then the client's own
    `receive`, which says when the client disconnects: `disconnected` remembers one that came
    before `answered()` (uvicorn also says "disconnect" to a listener once the answer is sent,
    as to a StreamingResponse's)."""

    def __init__(self, spool: IO[bytes], size: int, receive: Receive, answered: Callable[[], bool]) -> None:
        self._spool = spool
        self._left = size
        self._sent_body = False
        self._receive = receive
        self._answered = answered
        self.disconnected = False
        spool.seek(0)

    async def __call__(self) -> Message:
        if not self._sent_body:
            chunk = self._spool.read(min(CHUNK, self._left))
            self._left -= len(chunk)
            self._sent_body = self._left <= 0
            return {"type": "http.request", "body": chunk, "more_body": not self._sent_body}
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self._answered():
            self.disconnected = True
        return message
