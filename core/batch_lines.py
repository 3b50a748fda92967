"""Lines of OpenAI batch output and error files, built in one place for worker and API."""

from __future__ import annotations

import json
import uuid
from typing import Any


def _line(custom_id: str | None, response: dict[str, Any] | None, error: dict[str, str] | None) -> str:
    # ASCII only: model text may hold U+2028, U+0085 and the like, which `str.splitlines()`
    # (what most clients use on JSONL) treats as line breaks.
    # `custom_id` is on every line, null for a line too broken to have one (not JSON, or no
    # custom_id): a client that reads `line["custom_id"]` never meets a missing key. OpenAI's
    # schema has no null here, since OpenAI refuses such a file whole rather than run the rest.
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id}
    return json.dumps({**line, "response": response, "error": error})


def _response(status_code: int, request_id: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """A request that never became a job has no request id: left out rather than null."""
    out: dict[str, Any] = {"status_code": status_code, "request_id": request_id, "body": body}
    if request_id is None:
        del out["request_id"]
    return out


def success(custom_id: str, job_id: str, completion: dict[str, Any]) -> str:
    return _line(custom_id, _response(200, job_id, completion), None)


def request_failure(
    custom_id: str | None,
    job_id: str | None,
    status_code: int,
    message: str,
    code: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
) -> str:
    """A request-level failure: the response OpenAI would have sent (4xx/5xx with an error body)."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return _line(custom_id, _response(status_code, job_id, body), None)


def not_run(custom_id: str | None, code: str, message: str) -> str:
    """A line that never ran to completion: cancelled or expired."""
    return _line(custom_id, None, {"code": code, "message": message})
