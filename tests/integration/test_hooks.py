"""Hooks end to end (models.hooks, docs/hooks.md) on the `extras_stack`: the house hooks of
tests/support/hooks.py and a default system prompt for "tiny", through every way in (jobs,
chat, batches) and every way out (a poll, a chat answer, a batch's files, /metrics)."""

from __future__ import annotations

import io
import json
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import hooks as house
from tests.support.stack import Stack
from tests.support.wait import eventually

HOOK = "tests.support.hooks:house"


def _body(content: str, **kw: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


def _line(custom_id: str, content: str) -> str:
    return json.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": _body(content)}
    )


@pytest.fixture()
def client(extras_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{extras_stack.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _run_batch(client: openai.OpenAI, lines: list[str]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The finished batch, its output lines and its error lines, by custom_id."""
    data = ("\n".join(lines) + "\n").encode()
    f = client.files.create(file=("hooks.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def finished() -> Any:
        b = client.batches.retrieve(batch.id)
        return b if b.status in ("completed", "failed", "expired", "cancelled") else None

    done = eventually(finished, timeout=120, interval=0.2, message=f"batch {batch.id} finished")

    def lines_of(file_id: str | None) -> dict[str, Any]:
        if not file_id:
            return {}
        rows = [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()]
        return {row["custom_id"]: row for row in rows}

    return done, lines_of(done.output_file_id), lines_of(done.error_file_id)


def _error(resp: httpx.Response) -> dict[str, Any]:
    err: dict[str, Any] = resp.json()["error"]
    return err


# --- before: refusals ------------------------------------------------------------------


def test_a_before_refusal_is_a_400_with_the_hooks_message(extras_stack: Stack) -> None:
    with extras_stack.client() as c:
        for path in ("/v1/jobs", "/v1/chat/completions"):
            resp = c.post(path, json=_body(f"tell me about {house.REFUSE}"))
            assert resp.status_code == 400, resp.text
            err = _error(resp)
            assert err["code"] == "refused_by_hook" and err["message"] == house.REFUSAL_MESSAGE
            assert err["type"] == "invalid_request_error"
        broken = c.post("/v1/jobs", json=_body(house.BREAK_BEFORE))
        assert broken.status_code == 500 and _error(broken)["code"] == "hook_failed"
        assert _error(broken)["message"] == (
            f"hook '{HOOK}' before() failed: ValueError: the house filter broke on purpose"
        )
        assert c.post("/v1/jobs", json=_body("an ordinary request")).status_code == 202


# --- after: one result everywhere ------------------------------------------------------


def test_an_after_rewrite_is_what_every_reader_gets(extras_stack: Stack, client: openai.OpenAI) -> None:
    job_id = extras_stack.submit(f"{house.REWRITE} please", max_tokens=8)
    job = extras_stack.wait_job(job_id)
    assert job["status"] == "succeeded", job
    assert job["result"]["choices"][0]["message"]["content"] == house.REDACTED

    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": f"{house.REWRITE} again"}], max_tokens=8, n=2
    )
    assert [ch.message.content for ch in answer.choices] == [house.REDACTED, house.REDACTED]

    done, out, errors = _run_batch(
        client,
        [
            _line("rewrite", f"{house.REWRITE} in a batch"),
            _line("refuse", f"{house.REFUSE} in a batch"),
            _line("plain", "an ordinary line"),
        ],
    )
    assert done.status == "completed" and sorted(out) == ["plain", "rewrite"] and sorted(errors) == ["refuse"]
    assert out["rewrite"]["response"]["body"]["choices"][0]["message"]["content"] == house.REDACTED
    assert out["plain"]["response"]["body"]["choices"][0]["message"]["content"] != house.REDACTED
    refused = errors["refuse"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["code"] == "refused_by_hook"
    assert house.REFUSAL_MESSAGE in refused["body"]["error"]["message"]


def test_a_hook_that_raises_fails_its_job_alone(extras_stack: Stack, client: openai.OpenAI) -> None:
    done, out, errors = _run_batch(
        client, [_line("breaks", f"{house.BREAK_AFTER} now"), _line("mate", "its batch-mate")]
    )
    assert done.request_counts.completed == 1 and done.request_counts.failed == 1
    assert sorted(out) == ["mate"] and sorted(errors) == ["breaks"]
    err = errors["breaks"]["response"]["body"]["error"]
    assert err["code"] == "hook_failed"
    assert (
        err["message"] == f"hook '{HOOK}' after() failed: RuntimeError: the house redactor broke on purpose"
    )
    with extras_stack.client() as c:
        broke = c.get(f"/v1/jobs/{errors['breaks']['response']['request_id']}").json()
        mate = c.get(f"/v1/jobs/{out['mate']['response']['request_id']}").json()
    assert broke["status"] == "failed" and broke["error"]["code"] == "hook_failed"
    assert mate["status"] == "succeeded"
    # both lines were queued in one step, so they shared one engine call
    assert broke["engine_rows"] == mate["engine_rows"] == 2


def test_a_streaming_client_sees_a_veto_as_an_error_event(extras_stack: Stack) -> None:
    with extras_stack.client() as c:
        resp = c.post("/v1/chat/completions", json=_body(f"{house.VETO} this", stream=True))
        assert resp.status_code == 200
        events = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
    last = json.loads(events[-1])
    assert last["error"]["code"] == "refused_by_hook"
    assert last["error"]["message"].endswith("The house withholds this answer.")
    assert "[DONE]" not in events


# --- the default system prompt ---------------------------------------------------------


def test_the_default_system_prompt_reaches_the_model(client: openai.OpenAI) -> None:
    def prompt_tokens(*messages: dict[str, str]) -> int:
        answer = client.chat.completions.create(model="tiny", messages=list(messages), max_tokens=1)  # type: ignore[arg-type]
        assert answer.usage is not None
        return answer.usage.prompt_tokens

    user = {"role": "user", "content": "Say hi"}
    bare = prompt_tokens(user)
    # counted as if the request had brought the house prompt itself ...
    assert bare == prompt_tokens({"role": "system", "content": "You are the house assistant."}, user)
    # ... and not the template's own default (Qwen's, which the plain stack's "Say hi" gets)
    qwen = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert bare != prompt_tokens({"role": "system", "content": qwen}, user)


# --- metrics ---------------------------------------------------------------------------


def test_hook_time_shows_in_metrics(extras_stack: Stack) -> None:
    extras_stack.wait_job(extras_stack.submit("counted by the hooks"))
    with extras_stack.client() as c:
        assert c.post("/v1/jobs", json=_body(house.REFUSE)).status_code == 400

        def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            text = c.get("/metrics").text
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

        m = scraped()
    for stage in ("before", "after"):
        assert m[("inferq_hook_seconds_count", (("hook", HOOK), ("stage", stage)))] >= 1
        assert m[("inferq_hook_seconds_sum", (("hook", HOOK), ("stage", stage)))] > 0
    refused = (("hook", HOOK), ("outcome", "refused"), ("stage", "before"))
    assert m[("inferq_hook_outcomes_total", refused)] >= 1
