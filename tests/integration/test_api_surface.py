"""The API's surface as the official `openai` SDK meets it, on the echo stack: file listing that
its auto-paging walks to the end, a clear 404 for endpoints this server does not serve, and an
`x-request-id` on every answer (the SDK's `_request_id`)."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import httpx
import openai
import pytest

from tests.support.stack import Stack
from tests.support.wait import eventually

_LINE = json.dumps(
    {
        "custom_id": "c1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    }
)
_FRESH_ID = re.compile(r"req_[0-9a-f]{32}")


@pytest.fixture()
def client(echo_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{echo_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _upload(client: openai.OpenAI, n: int) -> list[str]:
    data = (_LINE + "\n").encode()
    return [client.files.create(file=(f"f{i}.jsonl", io.BytesIO(data)), purpose="batch").id for i in range(n)]


def test_sdk_auto_paging_lists_every_file_once(client: openai.OpenAI, echo_stack: Stack) -> None:
    mine = _upload(client, 4)
    whole = httpx.get(f"{echo_stack.base_url}/v1/files", timeout=30).json()  # the default limit: all
    everything = [f["id"] for f in whole["data"]]
    assert whole["has_more"] is False
    assert (whole["first_id"], whole["last_id"]) == (everything[0], everything[-1])
    paged = [f.id for f in client.files.list(limit=1)]  # one request per file, via `after`
    assert paged == everything and len(set(paged)) == len(paged)
    assert set(mine) <= set(paged)
    first = client.files.list(limit=1)
    assert first.has_more is True and len(first.data) == 1
    last = client.files.list(limit=1, after=everything[-2])
    assert [f.id for f in last.data] == [everything[-1]] and last.has_more is False


def test_order_and_purpose(client: openai.OpenAI, echo_stack: Stack) -> None:
    mine = set(_upload(client, 3))
    desc = list(client.files.list(limit=2))
    asc = list(client.files.list(limit=2, order="asc"))
    assert [f.id for f in asc] == [f.id for f in reversed(desc)]
    assert [f.created_at for f in desc] == sorted((f.created_at for f in desc), reverse=True)
    batch = client.batches.create(
        input_file_id=sorted(mine)[0], endpoint="/v1/chat/completions", completion_window="24h"
    )
    eventually(
        lambda: client.batches.retrieve(batch.id).status == "completed",
        timeout=60,
        interval=0.1,
        message="batch completed",
    )
    output = client.batches.retrieve(batch.id).output_file_id
    outputs = [f.id for f in client.files.list(purpose="batch_output", limit=1)]
    assert output in outputs and not mine & set(outputs)
    inputs = list(client.files.list(purpose="batch", order="asc"))
    assert mine <= {f.id for f in inputs} and {f.purpose for f in inputs} == {"batch"}
    assert output not in {f.id for f in inputs}


@pytest.mark.parametrize(
    ("params", "param"),
    [({"order": "newest"}, "order"), ({"limit": 0}, "limit"), ({"after": "file-nope"}, "after")],
)
def test_bad_list_parameters_are_named(echo_stack: Stack, params: dict[str, Any], param: str) -> None:
    resp = httpx.get(f"{echo_stack.base_url}/v1/files", params=params)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"


def test_unserved_endpoints_say_what_is_served(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as completions:
        client.completions.create(model="tiny", prompt="hi")
    with pytest.raises(openai.NotFoundError) as embeddings:
        client.embeddings.create(model="tiny", input="hi")
    for exc, path in ((completions.value, "/v1/completions"), (embeddings.value, "/v1/embeddings")):
        body = exc.body
        assert isinstance(body, dict) and exc.code == "unknown_endpoint" and body["param"] is None
        message = body["message"]
        assert f"POST {path} is not one of them" in message
        for served in ("/v1/chat/completions", "/v1/jobs", "/v1/files", "/v1/batches", "/v1/models"):
            assert served in message
        assert exc.request_id and _FRESH_ID.fullmatch(exc.request_id)


def test_unknown_path_and_wrong_method(echo_stack: Stack) -> None:
    with httpx.Client(base_url=echo_stack.base_url, timeout=30) as c:
        unknown = c.get("/v2/whatever")
        wrong = c.delete("/v1/jobs")
        gone = c.get("/v1/jobs/job_doesnotexist")
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"}
    assert set(unknown.json()["error"]) == {"message", "type", "param", "code"}
    assert unknown.json()["error"]["code"] == "unknown_endpoint"
    assert "GET /v2/whatever is not one of them" in unknown.json()["error"]["message"]
    assert wrong.status_code == 405, wrong.text
    error = wrong.json()["error"]
    assert error["code"] == "method_not_allowed" and "DELETE" in error["message"]
    assert {m.strip() for m in wrong.headers["allow"].split(",")} == {"GET", "POST"}
    # a route's own 404 is its own, not the unknown-endpoint one
    assert gone.status_code == 404 and gone.json()["error"]["code"] != "unknown_endpoint"


def test_every_answer_has_a_request_id(client: openai.OpenAI, echo_stack: Stack) -> None:
    msgs: list[Any] = [{"role": "user", "content": "id"}]
    done = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
    assert done._request_id and _FRESH_ID.fullmatch(done._request_id)
    listed = client.models.list()
    assert listed._request_id and listed._request_id != done._request_id
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, stream=True)
    with stream:
        assert _FRESH_ID.fullmatch(stream.response.headers["x-request-id"])
        assert [c for c in stream]
    own = client.with_options(default_headers={"X-Request-Id": "trace-42.a:b"}).models.list()
    assert own._request_id == "trace-42.a:b"
    odd = client.with_options(default_headers={"X-Request-Id": "x" * 500}).models.list()
    assert odd._request_id and _FRESH_ID.fullmatch(odd._request_id)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
    assert bad.value.request_id and _FRESH_ID.fullmatch(bad.value.request_id)
    job = echo_stack.submit("sse", max_tokens=4)
    url = f"{echo_stack.base_url}/v1/jobs/{job}/events"
    with httpx.stream("GET", url, headers={"X-Request-Id": "sse-1"}, timeout=30) as events:
        assert events.headers["x-request-id"] == "sse-1"
        assert "event: done" in "".join(events.iter_text())
