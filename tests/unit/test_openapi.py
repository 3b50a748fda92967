"""The OpenAPI document is what generated clients and /docs show: every endpoint says what
it does and which errors it answers, each with the one error body."""

from __future__ import annotations

from typing import Any

import pytest

from api.idempotency import PATHS as IDEMPOTENT_PATHS
from api.main import create_app
from core.config import Settings

_ERROR_REF = "#/components/schemas/ErrorResponse"


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def _error_ref(op: dict[str, Any], status: str) -> str | None:
    content = op["responses"].get(status, {}).get("content", {})
    ref: str | None = content.get("application/json", {}).get("schema", {}).get("$ref")
    return ref


def test_every_operation_has_a_summary(openapi: dict[str, Any]) -> None:
    missing = [f"{m.upper()} {p}" for p, m, op in _operations(openapi) if not op.get("summary")]
    assert not missing, missing


def test_every_v1_operation_documents_its_errors(openapi: dict[str, Any]) -> None:
    wrong = []
    for path, method, op in _operations(openapi):
        if not path.startswith("/v1/"):
            continue
        expected = {"401", "429", "503"}
        if "{" in path:
            expected.add("404")
        if method in ("post", "put") and "{" not in path:
            expected.add("400")
        for status in sorted(expected):
            if _error_ref(op, status) != _ERROR_REF:
                wrong.append(f"{method.upper()} {path}: {status}")
        # FastAPI's default 422 (we answer 400 with the OpenAI body); the one 422 we answer
        # is an Idempotency-Key used with another request
        unprocessable = op["responses"].get("422")
        if unprocessable is not None and _error_ref(op, "422") != _ERROR_REF:
            wrong.append(f"{method.upper()} {path}: documents FastAPI's 422")
        if unprocessable is not None and path not in IDEMPOTENT_PATHS:
            wrong.append(f"{method.upper()} {path}: documents 422")
    assert not wrong, wrong
