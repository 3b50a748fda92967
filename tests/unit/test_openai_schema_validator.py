"""The validator of OpenAI shapes (tests/support/openai_schema.py) against OpenAI's own
published schemas (openai/openai-openapi, vendored in tests/support/openai_schemas/): it can
fail, it honours OpenAPI 3.0's `nullable`, and the vendored file is what vendor.py makes.
tests/integration/test_openai_schema.py validates a running stack's answers with it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from tests.support.openai_schema import (
    VENDORED,
    assert_openai,
    assert_openai_all,
    document,
    names,
    openai_errors,
)
from tests.support.openai_schemas import vendor

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
