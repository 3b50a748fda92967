"""Every OpenAI-shaped answer of a running stack, validated against OpenAI's own published
schemas (openai/openai-openapi, vendored in tests/support/openai_schemas/): chat completions
and each stream chunk, models, files, batches, list objects, batch output and error lines
(and their `response.body`), and the error bodies. That the validator itself can fail is
tests/unit/test_openai_schema_validator.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.openai_schema import assert_openai, assert_openai_all, openai_errors
from tests.support.sse import iter_sse
from tests.support.stack import Stack, fresh_db, stack_env, start_stack
from tests.support.wait import eventually
from workers.engines.echo import FAIL_TRIGGER

KEY = "schema-key"

# ---------------------------------------------------------------- helpers for the stack

Checks = list[tuple[str, Any]]


def _chat(content: str = "schema", **kw: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


def _line(custom_id: str | None, content: str = "hi", **body: Any) -> str:
    item: dict[str, Any] = {"method": "POST", "url": "/v1/chat/completions", "body": _chat(content, **body)}
    if custom_id is not None:
        item["custom_id"] = custom_id
    return json.dumps(item)


def _ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, (resp.status_code, resp.text)
    return resp.json()


def _error(checks: Checks, resp: httpx.Response, status: int) -> None:
    assert resp.status_code == status, (resp.request.method, resp.request.url, resp.status_code, resp.text)
    checks.append(("ErrorResponse", resp.json()))


def _until(c: httpx.Client, path: str, done: Callable[[dict[str, Any]], bool], timeout: float = 120) -> Any:
    def reached() -> Any:
        body = _ok(c.get(path))
        return body if done(body) else None

    return eventually(
        reached,
        timeout=timeout,
        interval=0.1,
        message=lambda: f"{path} still {_ok(c.get(path)).get('status')}",
    )


def _upload(c: httpx.Client, data: bytes, name: str = "in.jsonl") -> dict[str, Any]:
    body: dict[str, Any] = _ok(c.post("/v1/files", files={"file": (name, data)}, data={"purpose": "batch"}))
    return body


def _create_batch(c: httpx.Client, file_id: str, **kw: Any) -> dict[str, Any]:
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **kw}
    batch: dict[str, Any] = _ok(c.post("/v1/batches", json=body))
    return batch


def _jsonl(c: httpx.Client, file_id: str) -> list[dict[str, Any]]:
    resp = c.get(f"/v1/files/{file_id}/content")
    assert resp.status_code == 200, resp.text
    return [json.loads(x) for x in resp.text.splitlines() if x.strip()]


def _stream(c: httpx.Client, body: dict[str, Any]) -> list[Any]:
    """The `data:` payloads of a streamed chat completion, up to and including [DONE]."""
    out: list[Any] = []
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for ev in iter_sse(resp):
            out.append(ev.data)
            if ev.data == "[DONE]":
                break
    return out


# ---------------------------------------------------------------- chat completions


def test_chat_completion(stack: Stack) -> None:
    checks: Checks = []
    with stack.client() as c:
        for body in (_chat(), _chat("two", n=2, temperature=0.9, seed=1), _chat("stop", stop=["a", "b"])):
            checks.append(("CreateChatCompletionResponse", _ok(c.post("/v1/chat/completions", json=body))))
    assert_openai_all(checks)


def test_each_stream_chunk(stack: Stack) -> None:
    with stack.client() as c:
        events = _stream(c, _chat("stream me", max_tokens=6))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 3  # the role chunk, some tokens, the finish
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert_openai_all(("CreateChatCompletionStreamResponse", chunk) for chunk in chunks)


def test_each_stream_chunk_with_usage_and_n(stack: Stack) -> None:
    with stack.client() as c:
        events = _stream(c, _chat("usage", max_tokens=5, n=2, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    assert_openai_all(("CreateChatCompletionStreamResponse", chunk) for chunk in events[:-1])


def test_stream_error_payload(echo_stack: Stack) -> None:
    """A generation that fails mid-stream ends with an OpenAI error object as its last data."""
    with echo_stack.client() as c:
        events = _stream(c, _chat(FAIL_TRIGGER))
    assert "error" in events[-1], events
    checks: Checks = [("CreateChatCompletionStreamResponse", chunk) for chunk in events[:-1]]
    assert_openai_all([*checks, ("ErrorResponse", events[-1])])


# ---------------------------------------------------------------- models


def test_models_list(stack: Stack) -> None:
    with stack.client() as c:
        listing = _ok(c.get("/v1/models"))
    assert [m["id"] for m in listing["data"]] == ["tiny"]
    assert_openai("ListModelsResponse", listing)


def test_model_by_id(stack: Stack) -> None:
    checks: Checks = []
    with stack.client() as c:
        checks.append(("Model", _ok(c.get("/v1/models/tiny"))))
        _error(checks, c.get("/v1/models/no-such-model"), 404)
    assert_openai_all(checks)


# ---------------------------------------------------------------- files


def test_file_upload_list_get_delete(stack: Stack) -> None:
    checks: Checks = []
    with stack.client() as c:
        made = _upload(c, (_line("f1") + "\n").encode(), "schema.jsonl")
        checks.append(("OpenAIFile", made))
        listing = _ok(c.get("/v1/files"))
        checks.append(("ListFilesResponse", listing))
        assert any(f["id"] == made["id"] for f in listing["data"])
        checks.append(("OpenAIFile", _ok(c.get(f"/v1/files/{made['id']}"))))
        deleted = _ok(c.delete(f"/v1/files/{made['id']}"))
        checks.append(("DeleteFileResponse", deleted))
        assert deleted == {"id": made["id"], "object": "file", "deleted": True}
        _error(checks, c.get(f"/v1/files/{made['id']}"), 404)
        _error(checks, c.delete(f"/v1/files/{made['id']}"), 404)
    assert_openai_all(checks)


def test_file_list_with_limit(stack: Stack) -> None:
    with stack.client() as c:
        for i in range(2):
            _upload(c, (_line(f"l{i}") + "\n").encode())
        listing = _ok(c.get("/v1/files", params={"limit": 1}))
    assert len(listing["data"]) == 1
    assert_openai("ListFilesResponse", listing)


# ---------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def finished_batch(stack: Stack) -> dict[str, Any]:
    """A batch of good and bad lines run to completion: its Batch objects and result lines."""
    lines = [
        _line("g1", "first"),
        "{not json",  # 400 in the error file
        _line(None),  # no custom_id: 400
        _line("g2", "second", n=2),
        _line("m1", model="nope"),  # unknown model: 404
        _line("b1", temperature=-1),  # invalid body: 400
    ]
    with stack.client() as c:
        f = _upload(c, ("\n".join(lines) + "\n").encode())
        created = _create_batch(c, f["id"], metadata={"run": "schema"})
        done = _until(c, f"/v1/batches/{created['id']}", lambda b: b["status"] in ("completed", "failed"))
        assert done["status"] == "completed", done
        files = [_ok(c.get(f"/v1/files/{done[k]}")) for k in ("output_file_id", "error_file_id")]
        out, errs = _jsonl(c, done["output_file_id"]), _jsonl(c, done["error_file_id"])
    return {"created": created, "done": done, "files": files, "out": out, "errs": errs}


def test_batch_create_and_completed(finished_batch: dict[str, Any]) -> None:
    done = finished_batch["done"]
    assert finished_batch["created"]["status"] in ("validating", "in_progress")
    assert done["request_counts"] == {"total": 6, "completed": 2, "failed": 4}
    assert_openai_all([("Batch", finished_batch["created"]), ("Batch", done)])


def test_batch_list(stack: Stack, finished_batch: dict[str, Any]) -> None:
    with stack.client() as c:
        listing = _ok(c.get("/v1/batches"))
        page = _ok(c.get("/v1/batches", params={"limit": 1}))
    assert any(b["id"] == finished_batch["done"]["id"] for b in listing["data"])
    assert len(page["data"]) == 1
    assert_openai_all([("ListBatchesResponse", listing), ("ListBatchesResponse", page)])


def test_batch_output_and_error_file_objects(finished_batch: dict[str, Any]) -> None:
    assert [f["purpose"] for f in finished_batch["files"]] == ["batch_output", "batch_output"]
    assert_openai_all(("OpenAIFile", f) for f in finished_batch["files"])


def test_batch_output_line_bodies(finished_batch: dict[str, Any]) -> None:
    out = finished_batch["out"]
    assert sorted(o["custom_id"] for o in out) == ["g1", "g2"]
    assert all(o["response"]["status_code"] == 200 for o in out)
    assert_openai_all(("CreateChatCompletionResponse", o["response"]["body"]) for o in out)


def test_batch_output_lines(finished_batch: dict[str, Any]) -> None:
    assert_openai_all(("BatchRequestOutput", o) for o in finished_batch["out"])


def test_batch_error_line_bodies(finished_batch: dict[str, Any]) -> None:
    errs = finished_batch["errs"]
    assert sorted(e["response"]["status_code"] for e in errs) == [400, 400, 400, 404]
    assert_openai_all(("ErrorResponse", e["response"]["body"]) for e in errs)


def test_batch_error_lines(finished_batch: dict[str, Any]) -> None:
    """Our one departure: a line with no usable custom_id (not JSON, none given) still runs
    the rest of the file and has `custom_id: null`, where OpenAI refuses the whole file; the
    rest of such a line is OpenAI's shape."""
    errs = finished_batch["errs"]
    assert all("custom_id" in e for e in errs) and sum(e["custom_id"] is None for e in errs) == 2
    named = [{k: v for k, v in e.items() if v is not None or k != "custom_id"} for e in errs]
    assert_openai_all(("BatchRequestOutput", e) for e in named)


def test_batch_cancel(stack: Stack) -> None:
    checks: Checks = []
    n = 12
    data = "\n".join(_line(f"c{i}", f"cancel me {i}", max_tokens=300) for i in range(n)).encode()
    with stack.client() as c:
        batch = _create_batch(c, _upload(c, data)["id"])
        running = _until(c, f"/v1/batches/{batch['id']}", lambda b: b["request_counts"]["completed"] >= 1)
        assert running["status"] == "in_progress"
        cancelling = _ok(c.post(f"/v1/batches/{batch['id']}/cancel"))
        assert cancelling["status"] in ("cancelling", "cancelled")
        done = _until(c, f"/v1/batches/{batch['id']}", lambda b: b["status"] == "cancelled")
        _error(checks, c.post(f"/v1/batches/{batch['id']}/cancel"), 409)
        out, errs = _jsonl(c, done["output_file_id"]), _jsonl(c, done["error_file_id"])
    assert errs and all(e["error"]["code"] == "batch_cancelled" and e["response"] is None for e in errs)
    assert len(out) >= 1 and len(out) + len(errs) == n
    checks += [("Batch", running), ("Batch", cancelling), ("Batch", done)]
    checks += [("BatchRequestOutput", line) for line in out + errs]
    checks += [("CreateChatCompletionResponse", o["response"]["body"]) for o in out]
    assert_openai_all(checks)


# ---------------------------------------------------------------- error bodies


def test_400_bodies(stack: Stack) -> None:
    checks: Checks = []
    with stack.client() as c:
        _error(checks, c.post("/v1/chat/completions", json=_chat(temperature=-1)), 400)
        _error(checks, c.post("/v1/chat/completions", json={**_chat(), "bogus": 1}), 400)
        _error(checks, c.post("/v1/chat/completions", json={"model": "tiny"}), 400)
        bad_json = c.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        _error(checks, bad_json, 400)
        _error(checks, c.post("/v1/chat/completions", json=_chat(stream=False, stream_options={})), 400)
        _error(checks, c.post("/v1/files", files={"file": ("e.jsonl", b"")}, data={"purpose": "batch"}), 400)
        wrong_purpose = c.post(
            "/v1/files", files={"file": ("p.jsonl", b"{}\n")}, data={"purpose": "fine-tune"}
        )
        _error(checks, wrong_purpose, 400)
        other_endpoint = {"input_file_id": "file-x", "endpoint": "/v1/embeddings", "completion_window": "24h"}
        _error(checks, c.post("/v1/batches", json=other_endpoint), 400)
    assert_openai_all(checks)


def test_404_bodies(stack: Stack) -> None:
    checks: Checks = []
    with stack.client() as c:
        _error(checks, c.post("/v1/chat/completions", json=_chat(model="no-such-model")), 404)
        _error(checks, c.get("/v1/files/file-doesnotexist0"), 404)
        _error(checks, c.get("/v1/files/file-doesnotexist0/content"), 404)
        _error(checks, c.get("/v1/batches/batch_nope"), 404)
        _error(checks, c.post("/v1/batches/batch_nope/cancel"), 404)
        _error(checks, c.get("/v1/no/such/route"), 404)
    assert_openai_all(checks)


def test_500_body(echo_stack: Stack) -> None:
    checks: Checks = []
    with echo_stack.client() as c:
        _error(checks, c.post("/v1/chat/completions", json=_chat(FAIL_TRIGGER)), 500)
    assert_openai_all(checks)


@pytest.fixture(scope="module")
def secure(redis_url: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack that wants an API key (echo engine, its own db)."""
    url = fresh_db(redis_url, 6)
    home = tmp_path_factory.mktemp("schema-secure-home")
    env = stack_env(url, demo_model, home, INFERQ_ENGINE="echo", INFERQ_API_KEYS=json.dumps([KEY]))
    st = start_stack(env, home, ready_headers={"Authorization": f"Bearer {KEY}"})
    yield st
    st.sup.stop_all()


def test_401_bodies(secure: Stack) -> None:
    checks: Checks = []
    with secure.client() as c:
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/v1/models/tiny"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/files"),
            ("GET", "/v1/batches"),
        ]:
            _error(checks, c.request(method, path, json=_chat() if method == "POST" else None), 401)
        _error(checks, c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert_openai_all(checks)


def test_empty_lists(secure: Stack) -> None:
    """A key that owns nothing yet gets empty lists. ListFilesResponse *requires* `first_id` and
    `last_id` as strings, which no empty list can honestly have: those two, and only those, may
    deviate there. Everything else must conform."""
    with secure.client() as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        files = _ok(c.get("/v1/files"))
        batches = _ok(c.get("/v1/batches"))
    assert files["data"] == [] and batches["data"] == []
    unsatisfiable = [e for e in openai_errors("ListFilesResponse", files) if not e.startswith(" ")]
    # null where a string is wanted, or (if they are left out) "... is a required property"
    assert all(
        e.startswith(("$.first_id: ", "$.last_id: ")) or (e.startswith("$: ") and "_id" in e)
        for e in unsatisfiable
    ), unsatisfiable
    assert_openai("ListBatchesResponse", batches)
