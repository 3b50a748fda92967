"""Every OpenAI-shaped answer of a running stack, validated against OpenAI's own published
schemas (openai/openai-openapi, vendored in tests/openai_schemas/): chat completions and each
stream chunk, models, files, batches, list objects, batch output and error lines (and their
`response.body`), and the error bodies. The first tests prove the validator can fail."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest

from tests.conftest import Stack, fresh_db, stack_env, start_stack
from tests.openai_schema import VENDORED, assert_openai, assert_openai_all, document, names, openai_errors
from tests.openai_schemas import vendor
from tests.sse import iter_sse
from workers.engines.echo import FAIL_TRIGGER

integration = pytest.mark.integration

KEY = "schema-key"

# ---------------------------------------------------------------- the validator itself

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "tiny",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}

CHUNK: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "tiny",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None, "logprobs": None}],
}


def test_a_conforming_completion_passes() -> None:
    assert_openai("CreateChatCompletionResponse", COMPLETION)


def test_the_validator_rejects_a_missing_refusal_and_a_wrong_object() -> None:
    bad = copy.deepcopy(COMPLETION)
    del bad["choices"][0]["message"]["refusal"]
    bad["object"] = "chat.completions"
    errors = openai_errors("CreateChatCompletionResponse", bad)
    assert len(errors) == 2, errors
    assert errors[0].startswith("$.choices[0].message: ") and "refusal" in errors[0]
    assert errors[1].startswith("$.object: ") and "chat.completions" in errors[1]
    with pytest.raises(AssertionError, match=r"\$\.choices\[0\]\.message: .*refusal"):
        assert_openai("CreateChatCompletionResponse", bad)


def test_openapi30_nullable_is_honoured_both_ways() -> None:
    """`finish_reason` and `usage` are `nullable: true` in the spec (the 3.0 way): null passes,
    a value outside the enum or of the wrong shape does not."""
    assert_openai("CreateChatCompletionStreamResponse", {**CHUNK, "usage": None})
    wrong = copy.deepcopy(CHUNK)
    wrong["choices"][0]["finish_reason"] = "cancelled"
    wrong["usage"] = {"prompt_tokens": 1}
    paths = {e.split(":")[0] for e in openai_errors("CreateChatCompletionStreamResponse", wrong)}
    assert {"$.choices[0].finish_reason", "$.usage"} <= paths, paths


def test_assert_all_lists_each_distinct_error_once() -> None:
    role_null = copy.deepcopy(CHUNK)
    role_null["choices"][0]["delta"]["role"] = None
    assert_openai_all([("CreateChatCompletionStreamResponse", CHUNK)] * 3)
    with pytest.raises(AssertionError) as err:
        assert_openai_all([("CreateChatCompletionStreamResponse", c) for c in (CHUNK, role_null, role_null)])
    lines = str(err.value).splitlines()[1:]
    assert lines and all("$.choices[0].delta.role" in x and x.endswith("(in 2 of 3)") for x in lines), lines


def test_vendored_file_is_small_closed_and_credited() -> None:
    doc = json.loads(VENDORED.read_text())
    header = doc["x-vendored"]
    assert header["repository"] == "https://github.com/openai/openai-openapi"
    assert header["license"] == "MIT"
    assert [s["commit"][:7] for s in header["sources"]] == ["f85dbe2", "498c71d"]
    schemas = doc["components"]["schemas"]
    # exactly the roots and what they reference, nothing more
    assert vendor.closure(schemas, vendor.ROOTS + vendor.LEGACY_ROOTS).keys() == schemas.keys()
    assert VENDORED.stat().st_size < 64_000
    for name in names():  # every schema, once `nullable` is rewritten, is valid 2020-12
        jsonschema_rs.meta.validate(document()["components"]["schemas"][name])


def test_vendor_script_reproduces_the_file(tmp_path: Path) -> None:
    """Where a clone of the spec's repository is at hand (OPENAI_OPENAPI_REPO), vendor.py makes
    the committed file byte for byte."""
    repo = Path(os.environ.get("OPENAI_OPENAPI_REPO", "/work/.mirror/openai+openai-openapi/repo"))
    if not repo.exists():
        pytest.skip("no clone of openai/openai-openapi (set OPENAI_OPENAPI_REPO)")
    spec, legacy, out = tmp_path / "openapi.json", tmp_path / "openapi.yaml", tmp_path / "out.json"
    for commit, path, name in [
        (vendor.COMMIT, spec, "openapi.json"),
        (vendor.LEGACY_COMMIT, legacy, "openapi.yaml"),
    ]:
        show = subprocess.run(
            ["git", "-C", str(repo), "show", f"{commit}:{name}"], capture_output=True, check=True
        )
        path.write_bytes(show.stdout)
    vendor.main([str(spec), "--legacy-spec", str(legacy), "-o", str(out)])
    assert out.read_bytes() == VENDORED.read_bytes()


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
    deadline = time.monotonic() + timeout
    while True:
        body = _ok(c.get(path))
        if done(body):
            return body
        assert time.monotonic() < deadline, f"{path} still {body.get('status')} after {timeout}s"
        time.sleep(0.1)


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


@integration
def test_chat_completion(stack: Stack) -> None:
    checks: Checks = []
    with stack.client() as c:
        for body in (_chat(), _chat("two", n=2, temperature=0.9, seed=1), _chat("stop", stop=["a", "b"])):
            checks.append(("CreateChatCompletionResponse", _ok(c.post("/v1/chat/completions", json=body))))
    assert_openai_all(checks)


@integration
def test_each_stream_chunk(stack: Stack) -> None:
    with stack.client() as c:
        events = _stream(c, _chat("stream me", max_tokens=6))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 3  # the role chunk, some tokens, the finish
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert_openai_all(("CreateChatCompletionStreamResponse", chunk) for chunk in chunks)


@integration
def test_each_stream_chunk_with_usage_and_n(stack: Stack) -> None:
    with stack.client() as c:
        events = _stream(c, _chat("usage", max_tokens=5, n=2, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    assert_openai_all(("CreateChatCompletionStreamResponse", chunk) for chunk in events[:-1])


@integration
def test_stream_error_payload(echo_stack: Stack) -> None:
    """A generation that fails mid-stream ends with an OpenAI error object as its last data."""
    with echo_stack.client() as c:
        events = _stream(c, _chat(FAIL_TRIGGER))
    assert "error" in events[-1], events
    checks: Checks = [("CreateChatCompletionStreamResponse", chunk) for chunk in events[:-1]]
    assert_openai_all([*checks, ("ErrorResponse", events[-1])])


# ---------------------------------------------------------------- models


@integration
def test_models_list(stack: Stack) -> None:
    with stack.client() as c:
        listing = _ok(c.get("/v1/models"))
    assert [m["id"] for m in listing["data"]] == ["tiny"]
    assert_openai("ListModelsResponse", listing)


@integration
def test_model_by_id(stack: Stack) -> None:
    checks: Checks = []
    with stack.client() as c:
        checks.append(("Model", _ok(c.get("/v1/models/tiny"))))
        _error(checks, c.get("/v1/models/no-such-model"), 404)
    assert_openai_all(checks)


# ---------------------------------------------------------------- files


@integration
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


@integration
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


@integration
def test_batch_create_and_completed(finished_batch: dict[str, Any]) -> None:
    done = finished_batch["done"]
    assert finished_batch["created"]["status"] in ("validating", "in_progress")
    assert done["request_counts"] == {"total": 6, "completed": 2, "failed": 4}
    assert_openai_all([("Batch", finished_batch["created"]), ("Batch", done)])


@integration
def test_batch_list(stack: Stack, finished_batch: dict[str, Any]) -> None:
    with stack.client() as c:
        listing = _ok(c.get("/v1/batches"))
        page = _ok(c.get("/v1/batches", params={"limit": 1}))
    assert any(b["id"] == finished_batch["done"]["id"] for b in listing["data"])
    assert len(page["data"]) == 1
    assert_openai_all([("ListBatchesResponse", listing), ("ListBatchesResponse", page)])


@integration
def test_batch_output_and_error_file_objects(finished_batch: dict[str, Any]) -> None:
    assert [f["purpose"] for f in finished_batch["files"]] == ["batch_output", "batch_output"]
    assert_openai_all(("OpenAIFile", f) for f in finished_batch["files"])


@integration
def test_batch_output_line_bodies(finished_batch: dict[str, Any]) -> None:
    out = finished_batch["out"]
    assert sorted(o["custom_id"] for o in out) == ["g1", "g2"]
    assert all(o["response"]["status_code"] == 200 for o in out)
    assert_openai_all(("CreateChatCompletionResponse", o["response"]["body"]) for o in out)


@integration
def test_batch_output_lines(finished_batch: dict[str, Any]) -> None:
    assert_openai_all(("BatchRequestOutput", o) for o in finished_batch["out"])


@integration
def test_batch_error_line_bodies(finished_batch: dict[str, Any]) -> None:
    errs = finished_batch["errs"]
    assert sorted(e["response"]["status_code"] for e in errs) == [400, 400, 400, 404]
    assert_openai_all(("ErrorResponse", e["response"]["body"]) for e in errs)


@integration
def test_batch_error_lines(finished_batch: dict[str, Any]) -> None:
    assert_openai_all(("BatchRequestOutput", e) for e in finished_batch["errs"])


@integration
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


@integration
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


@integration
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


@integration
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


@integration
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


@integration
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
