"""Failure handling with real processes: an engine error fails only its job, a hung
generation is failed by the watchdog and the worker recovers, and a pool child killed
mid-stream is redelivered with a `reset` so the streamed text stays consistent."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import redis

from core import keys
from tests.conftest import Stack
from tests.sse import final_text, iter_sse, read_job_events
from workers.fake import FAIL_TRIGGER, STALL_TRIGGER

pytestmark = pytest.mark.integration


def _submit(stack: Stack, content: str, **kw: object) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}
    resp = httpx.post(f"{stack.base_url}/v1/jobs", json=body, timeout=30)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def _child_pid(stack: Stack) -> int:
    return int(httpx.get(f"{stack.base_url}/ready", timeout=5).json()["workers"][0]["pid"])


def test_engine_error_fails_only_that_job(echo_stack: Stack) -> None:
    pid = _child_pid(echo_stack)
    bad = echo_stack.wait_job(_submit(echo_stack, FAIL_TRIGGER))
    good = echo_stack.wait_job(_submit(echo_stack, "still serving"))
    assert bad["status"] == "failed" and bad["error"]["code"] == "engine_error"
    assert "failure requested" in bad["error"]["message"]
    assert (
        good["status"] == "succeeded"
        and good["result"]["choices"][0]["message"]["content"] == "still serving"
    )
    assert _child_pid(echo_stack) == pid  # the same warm child kept serving


def test_hung_generation_is_failed_and_the_worker_recovers(echo_stack: Stack) -> None:
    pid = _child_pid(echo_stack)
    hung = _submit(echo_stack, STALL_TRIGGER)
    after = _submit(echo_stack, "after the hang")
    done = echo_stack.wait_job(hung, timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "engine_stalled"
    nxt = echo_stack.wait_job(after, timeout=60)
    assert nxt["status"] == "succeeded"
    pids = [w["pid"] for w in httpx.get(f"{echo_stack.base_url}/ready").json()["workers"]]
    assert pids and pid not in pids  # a fresh child replaced the hung one
    again = httpx.get(f"{echo_stack.base_url}/v1/jobs/{hung}").json()
    assert again["status"] == "failed" and again["attempts"] == 1  # the requeued message was skipped


def test_child_killed_mid_stream_is_redelivered_with_reset(stack: Stack, r: redis.Redis) -> None:
    job_id = _submit(stack, "crash me", max_tokens=1500, temperature=0.8)
    events = []
    with httpx.stream("GET", f"{stack.base_url}/v1/jobs/{job_id}/events", timeout=120) as resp:
        killed = False
        for ev in iter_sse(resp):
            events.append(ev)
            if ev.event == "token" and not killed and sum(e.event == "token" for e in events) >= 3:
                worker = httpx.get(f"{stack.base_url}/ready", timeout=5).json()["workers"][0]
                os.kill(worker["pid"], signal.SIGKILL)
                r.delete(keys.worker(worker["worker_id"]))  # do not wait for its heartbeat to expire
                killed = True
            if ev.event in ("done", "error", "cancelled"):
                break
    kinds = [e.event for e in events]
    assert kinds[-1] == "done", kinds[-5:]
    assert "reset" in kinds
    first_reset = kinds.index("reset")
    assert "token" in kinds[:first_reset] and "token" in kinds[first_reset:]
    result = events[-1].data
    assert final_text(events) == result["choices"][0]["message"]["content"]
    job = httpx.get(f"{stack.base_url}/v1/jobs/{job_id}").json()
    assert job["attempts"] == 2 and job["status"] == "succeeded"
    assert read_job_events(stack.base_url, job_id)[-1].data == result  # replay agrees
