"""Failure handling with real processes: an engine error fails only its job, a hung
generation is failed by the watchdog and the worker recovers, and a pool child killed
mid-stream is redelivered with a `reset` so the streamed text stays consistent."""

from __future__ import annotations

import os
import signal

import httpx
import redis

from core import keys
from tests.support.sse import final_text, iter_sse, read_job_events
from tests.support.stack import Stack
from workers.engines.echo import CRASH_TRIGGER, FAIL_TRIGGER, SLOW_TRIGGER, STALL_TRIGGER


def _child_pid(stack: Stack) -> int:
    return int(httpx.get(f"{stack.base_url}/ready", timeout=5).json()["workers"][0]["pid"])


def test_engine_error_fails_only_that_job(echo_stack: Stack) -> None:
    pid = _child_pid(echo_stack)
    bad = echo_stack.wait_job(echo_stack.submit(FAIL_TRIGGER))
    good = echo_stack.wait_job(echo_stack.submit("still serving"))
    assert bad["status"] == "failed" and bad["error"]["code"] == "engine_error"
    assert "failure requested" in bad["error"]["message"]
    assert (
        good["status"] == "succeeded"
        and good["result"]["choices"][0]["message"]["content"] == "still serving"
    )
    assert _child_pid(echo_stack) == pid  # the same warm child kept serving


def test_hung_generation_is_failed_and_the_worker_recovers(echo_stack: Stack) -> None:
    pid = _child_pid(echo_stack)
    hung = echo_stack.submit(STALL_TRIGGER)
    after = echo_stack.submit("after the hang")
    done = echo_stack.wait_job(hung, timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "engine_stalled"
    nxt = echo_stack.wait_job(after, timeout=60)
    assert nxt["status"] == "succeeded"
    pids = [w["pid"] for w in httpx.get(f"{echo_stack.base_url}/ready").json()["workers"]]
    assert pids and pid not in pids  # a fresh child replaced the hung one
    again = httpx.get(f"{echo_stack.base_url}/v1/jobs/{hung}").json()
    assert again["status"] == "failed" and again["attempts"] == 1  # the requeued message was skipped


def test_child_killed_mid_stream_is_redelivered_with_reset(any_stack: Stack, r: redis.Redis) -> None:
    stack = any_stack
    job_id = stack.submit("crash me", max_tokens=1500, temperature=0.8)
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


def test_poison_job_is_retried_then_failed_and_the_queue_moves_on(echo_stack: Stack) -> None:
    poison = echo_stack.submit(CRASH_TRIGGER)
    behind = [echo_stack.submit(f"behind the poison {i}") for i in range(3)]
    done = echo_stack.wait_job(poison, timeout=120)
    assert done["status"] == "failed" and done["error"]["code"] == "worker_crashed"
    assert done["attempts"] == 3  # INFERQ_MAX_ATTEMPTS
    assert all(echo_stack.wait_job(j, timeout=60)["status"] == "succeeded" for j in behind)


def test_time_limit_fails_the_job_and_frees_the_worker(echo_stack: Stack) -> None:
    slow = echo_stack.submit(SLOW_TRIGGER, inferq={"timeout_s": 0.3})
    after = echo_stack.submit("next in line")
    done = echo_stack.wait_job(slow)
    assert done["status"] == "failed" and done["error"]["code"] == "timeout"
    assert echo_stack.wait_job(after)["status"] == "succeeded"
    too_long = httpx.post(
        f"{echo_stack.base_url}/v1/jobs",
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "inferq": {"timeout_s": 10**6},
        },
    )
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "inferq.timeout_s"


def test_jobs_queued_past_their_expiry_never_run(echo_stack: Stack) -> None:
    blocker = echo_stack.submit(SLOW_TRIGGER)
    echo_stack.wait_running(blocker)
    stale = echo_stack.submit("too late", inferq={"expires_after_s": 0.3})
    echo_stack.wait_job(blocker)
    done = echo_stack.wait_job(stale)
    assert done["status"] == "expired" and done["started_at"] is None and done["attempts"] == 0


def test_out_of_memory_batch_is_split_before_any_job_fails(echo_stack: Stack) -> None:
    blocker = echo_stack.submit(SLOW_TRIGGER)
    echo_stack.wait_running(blocker)
    jobs = [echo_stack.submit(f"big batch {i}") for i in range(6)]  # echo OOMs above 3 rows
    echo_stack.wait_job(blocker)
    done = [echo_stack.wait_job(j) for j in jobs]
    assert all(d["status"] == "succeeded" for d in done)
    assert max(d["engine_rows"] for d in done) == 6
    events = read_job_events(echo_stack.base_url, jobs[0])
    assert "reset" in [e.event for e in events]  # its first try, in the big batch, was discarded
    assert final_text(events) == done[0]["result"]["choices"][0]["message"]["content"]
