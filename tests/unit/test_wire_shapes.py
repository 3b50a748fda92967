"""Shapes every client parses: timestamps are whole Unix seconds on a job as on files and
batches (OpenAI's convention), while the record keeps the fraction for what measures time;
every batch error line has a `custom_id` key."""

from __future__ import annotations

import json
from typing import Any

from api.main import create_app
from core import batch_lines, job_store
from core.config import Settings
from schemas.openai import ChatCompletionRequest

_TIMES = ("created_at", "expires_at", "started_at", "finished_at")


def _record() -> job_store.JobRecord:
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    raw = job_store.encode_new("job_1", request, "inferq.jobs", 1796281135.557, 3)
    raw |= {"expires_at": "1796281195.9", "started_at": "1796281136.25", "finished_at": "1796281137.75"}
    record = job_store.decode(raw)
    assert record is not None
    return record


def test_a_job_shows_whole_seconds_and_its_record_keeps_the_fraction() -> None:
    record = _record()
    shown = json.loads(record.job.model_dump_json())
    assert [shown[k] for k in _TIMES] == [1796281135, 1796281195, 1796281136, 1796281137]
    assert all(type(shown[k]) is int for k in _TIMES)
    assert record.expires_at == 1796281195.9  # expiry is checked to the fraction (workers.claim)


def test_the_openapi_job_schema_says_integer() -> None:
    doc: dict[str, Any] = create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi()
    props = doc["components"]["schemas"]["Job"]["properties"]
    assert props["created_at"]["type"] == "integer"
    for k in _TIMES[1:]:
        assert {"type": "integer"} in props[k]["anyOf"], props[k]


def test_every_batch_error_line_has_a_custom_id_null_when_unknown() -> None:
    unparsable = json.loads(batch_lines.request_failure(None, None, 400, "line 2: not JSON", "invalid_json"))
    cancelled = json.loads(batch_lines.not_run(None, "batch_cancelled", "cancelled"))
    named = json.loads(batch_lines.not_run("q1", "batch_expired", "expired"))
    assert "custom_id" in unparsable and unparsable["custom_id"] is None
    assert "custom_id" in cancelled and cancelled["custom_id"] is None
    assert named["custom_id"] == "q1"
