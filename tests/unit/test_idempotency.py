"""Which answers an `Idempotency-Key` keeps (api.idempotency.Recorder)."""

from __future__ import annotations

import base64

import pytest
from starlette.types import Message

from api.idempotency import Recorder


async def _answer(status: int, ctype: bytes = b"application/json", complete: bool = True) -> Recorder:
    async def send(_: Message) -> None:
        return None

    recorder = Recorder(send)
    headers = [(b"content-type", ctype), (b"x-request-id", b"req_1"), (b"X-Inferq-Job-Id", b"job_1")]
    await recorder({"type": "http.response.start", "status": status, "headers": headers})
    await recorder({"type": "http.response.body", "body": b'{"id": 1}', "more_body": not complete})
    return recorder


@pytest.mark.parametrize("status", [200, 202, 400, 404, 409, 422])
async def test_kept(status: int) -> None:
    record = (await _answer(status)).record("fp")
    assert record is not None and record["status"] == status
    assert base64.b64decode(record["body"]) == b'{"id": 1}'
    assert record["headers"] == [["content-type", "application/json"], ["x-inferq-job-id", "job_1"]]


@pytest.mark.parametrize("status", [401, 403, 429, 500, 503, 504])
async def test_not_kept(status: int) -> None:
    assert (await _answer(status)).record("fp") is None


async def test_an_unfinished_answer_is_not_kept() -> None:
    assert (await _answer(200, complete=False)).record("fp") is None


async def test_a_stream_keeps_its_job_id_not_its_body() -> None:
    record = (await _answer(200, b"text/event-stream; charset=utf-8")).record("fp")
    assert record is not None and record["streamed"] and "body" not in record
    assert ["x-inferq-job-id", "job_1"] in record["headers"]
