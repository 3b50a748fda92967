"""The body read once (api.spooled_body): its fingerprint, and the same bytes handed on."""

from __future__ import annotations

import pytest
from starlette.types import Message, Scope

from api.spooled_body import CHUNK, Fingerprint, Replay, multipart_boundary, read_body


def _scope(content_type: str = "application/json", path: str = "/v1/files") -> Scope:
    return {
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [(b"content-type", content_type.encode())],
    }


def _multipart(boundary: str, content: bytes) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


def _digest(scope: Scope, body: bytes, step: int) -> str:
    fp = Fingerprint(scope)
    for i in range(0, len(body), step):
        fp.update(body[i : i + step])
    return fp.hexdigest()


@pytest.mark.parametrize("step", [1, 3, 7, 64, 10_000])
def test_a_multipart_fingerprint_ignores_the_boundary_however_the_body_is_cut(step: int) -> None:
    content = b'{"custom_id": "a"}\n'
    one = _digest(_scope("multipart/form-data; boundary=aaaa1111"), _multipart("aaaa1111", content), 10_000)
    other = _digest(_scope('multipart/form-data; boundary="zz-99"'), _multipart("zz-99", content), step)
    assert one == other
    changed = _digest(
        _scope("multipart/form-data; boundary=zz-99"), _multipart("zz-99", content + b"x"), step
    )
    assert changed != one


def test_a_json_fingerprint_is_the_bytes_and_the_path() -> None:
    body = b'{"model": "tiny"}'
    assert _digest(_scope(), body, 4) == _digest(_scope(), body, 100)
    assert _digest(_scope(), body, 4) != _digest(_scope(path="/v1/jobs"), body, 4)
    assert _digest(_scope(), body, 4) != _digest(_scope(), body + b" ", 4)


def test_multipart_boundary() -> None:
    assert multipart_boundary('multipart/form-data; charset=utf-8; boundary="b-1"') == b"b-1"
    assert multipart_boundary("application/json") == b""


async def test_the_app_reads_the_same_bytes_in_chunks_then_the_clients_receive() -> None:
    body = bytes(range(256)) * (3 * CHUNK // 256 + 5)
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    messages: list[Message] = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)
    ]
    messages.append({"type": "http.disconnect"})

    async def receive() -> Message:
        return messages.pop(0)

    spool, size, _ = await read_body(_scope(), receive)
    with spool:
        replay = Replay(spool, size, receive, answered=lambda: False)
        got, more = b"", True
        while more:
            message = await replay()
            assert len(message["body"]) <= CHUNK
            got, more = got + message["body"], message["more_body"]
        assert got == body
        assert (await replay())["type"] == "http.disconnect" and replay.disconnected
