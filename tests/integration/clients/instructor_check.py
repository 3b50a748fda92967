"""One instructor call against an OpenAI-compatible server, as a JSON verdict on stdout.

Run with the instructor venv's python (instructor pins its own openai, so it lives apart
from the project's venv):

    .venv-instructor/bin/python tests/integration/clients/instructor_check.py BASE_URL MODE [MODEL]

BASE_URL ends in /v1; MODE is an `instructor.Mode` name (JSON, TOOLS, JSON_SCHEMA, MD_JSON,
...). The verdict: {"mode", "ok", "object" (the validated object, when ok), "error_type",
"error", "status_code" (of an HTTP error), "finish_reason", "content", "tool_calls" (from the
server's last answer), "requests" (how many were sent), "versions"}. Exit status 0 whenever a
verdict was printed: the test reads the verdict, not the status.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from typing import Any, Literal

import instructor
import openai
from pydantic import BaseModel, Field


class Verdict(BaseModel):
    """A sentiment verdict."""

    label: Literal["pos", "neg", "neutral"]
    score: int = Field(ge=0, le=100)
    word: str = Field(max_length=8, description="one short word")


MESSAGES = [{"role": "user", "content": "Judge the review 'I love it'."}]


def main() -> int:
    base_url, mode_name = sys.argv[1], sys.argv[2]
    model = sys.argv[3] if len(sys.argv) > 3 else "tiny"
    answers: list[dict[str, Any]] = []

    def answered(completion: Any) -> None:
        answers.append({"status": 200, "body": completion.model_dump()})

    def failed(exc: Exception) -> None:
        if isinstance(exc, openai.APIStatusError):
            answers.append({"status": exc.status_code, "body": exc.response.text[:2000]})

    raw = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
    client = instructor.from_openai(raw, mode=getattr(instructor.Mode, mode_name))
    # instructor's hooks: each answer the server gave, and each HTTP error
    client.on("completion:response", answered)
    client.on("completion:error", failed)
    verdict: dict[str, Any] = {
        "mode": mode_name,
        "versions": {p: version(p) for p in ("instructor", "openai", "pydantic")},
    }
    try:
        obj = client.chat.completions.create(
            model=model,
            response_model=Verdict,
            messages=MESSAGES,
            max_tokens=200,
            temperature=0,
            # one attempt: constrained decoding must be right the first time (a retry would
            # also send a different conversation)
            max_retries=0,
        )
        verdict.update(ok=True, object=obj.model_dump())
    except Exception as exc:  # the verdict says what went wrong
        verdict.update(ok=False, error_type=type(exc).__name__, error=str(exc)[:3000])
        cause = exc if isinstance(exc, openai.APIStatusError) else exc.__cause__
        verdict["status_code"] = cause.status_code if isinstance(cause, openai.APIStatusError) else None
    verdict["requests"] = len(answers)
    if answers:
        last = answers[-1]
        verdict["last_status"] = last["status"]
        body = last["body"]
        if isinstance(body, dict) and body.get("choices"):
            choice = body["choices"][0]
            verdict["finish_reason"] = choice.get("finish_reason")
            verdict["content"] = choice["message"].get("content")
            verdict["tool_calls"] = choice["message"].get("tool_calls")
        else:
            verdict["error_body"] = body
    print(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
