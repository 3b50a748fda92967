"""Micro-batching on a real worker: a backlog runs in batches > 1 whose results equal the
same requests run alone; a poisoned request fails alone; killing the pool child mid-batch
ends with every job succeeded exactly once."""

from __future__ import annotations

import os
import signal
import time

import httpx
import redis

from core import keys
from core.job_store import JobStore
from schemas.openai import ChatCompletionRequest
from tests.support.sse import read_job_events
from tests.support.stack import Stack
from tests.support.wait import eventually
from workers.engines.echo import FAIL_TRIGGER, SLOW_TRIGGER


def test_backlog_runs_in_batches_with_the_same_results_as_alone(any_stack: Stack) -> None:
    stack = any_stack
    prompts = [f"batch me {i} " + "x " * i for i in range(6)]
    alone = []
    for p in prompts:  # one at a time: each runs alone
        alone.append(stack.wait_job(stack.submit(p, max_tokens=20, temperature=0)))
    assert all(j["engine_rows"] == 1 for j in alone)
    stack.block_worker()
    together = [stack.submit(p, max_tokens=20, temperature=0) for p in prompts]
    done = [stack.wait_job(j) for j in together]
    assert max(j["engine_rows"] for j in done) > 1
    # the field's old name is still sent for one release (CHANGELOG), with the same value
    assert all(j["batch_size"] == j["engine_rows"] for j in [*alone, *done])
    for a, b in zip(alone, done, strict=True):
        assert b["status"] == "succeeded"
        assert (
            b["result"]["choices"][0]["message"]["content"] == a["result"]["choices"][0]["message"]["content"]
        )
        assert b["result"]["usage"] == a["result"]["usage"]


def test_jobs_of_a_batch_stream_concurrently(any_stack: Stack) -> None:
    stack = any_stack
    stack.block_worker()
    jobs = [stack.submit(f"concurrent {i}", max_tokens=200, temperature=0.7) for i in range(4)]
    for j in jobs:
        stack.wait_job(j)
    streams = {j: read_job_events(stack.base_url, j) for j in jobs}
    sizes = [httpx.get(f"{stack.base_url}/v1/jobs/{j}").json()["engine_rows"] for j in jobs]
    if stack.continuous:  # the blocking job runs beside them
        assert all(s >= 4 for s in sizes), sizes
    else:
        assert sizes == [4, 4, 4, 4]
    first_token = {
        j: next(int(e.id.split("-")[0]) for e in ev if e.event == "token") for j, ev in streams.items()
    }
    first_done = min(int(ev[-1].id.split("-")[0]) for ev in streams.values())
    assert max(first_token.values()) < first_done  # every first token before any job ends


def test_poisoned_request_fails_alone(echo_stack: Stack) -> None:
    blocker = echo_stack.submit(SLOW_TRIGGER)  # keeps the worker busy while the others queue up
    echo_stack.wait_running(blocker)
    jobs = [echo_stack.submit(FAIL_TRIGGER if i == 2 else f"ok {i}") for i in range(5)]
    results = [echo_stack.wait_job(j) for j in jobs]
    echo_stack.wait_job(blocker)
    assert [r["status"] for r in results] == ["succeeded", "succeeded", "failed", "succeeded", "succeeded"]
    assert results[2]["error"]["code"] == "engine_error"
    assert results[2]["engine_rows"] == 5 and all(r["engine_rows"] == 5 for r in results)  # it shared a batch


def test_kill_pool_child_mid_batch_every_job_succeeds_once(any_stack: Stack, r: redis.Redis) -> None:
    stack = any_stack
    stack.block_worker()
    jobs = [stack.submit(f"survive {i}", max_tokens=500, temperature=0.8) for i in range(6)]

    def backlog_running() -> bool:  # the backlog's batch is running
        states = [httpx.get(f"{stack.base_url}/v1/jobs/{j}").json()["status"] for j in jobs]
        return states.count("running") >= 2

    eventually(backlog_running, timeout=60, interval=0.02, message="two of the backlog running")
    worker = httpx.get(f"{stack.base_url}/ready").json()["workers"][0]
    os.kill(worker["pid"], signal.SIGKILL)
    r.delete(keys.worker(worker["worker_id"]))
    t0 = time.monotonic()
    done = [stack.wait_job(j, timeout=120) for j in jobs]
    recovery = time.monotonic() - t0
    assert all(d["status"] == "succeeded" for d in done), [d["status"] for d in done]
    assert any(d["attempts"] == 2 for d in done)
    for j in jobs:
        events = read_job_events(stack.base_url, j)
        assert [e.event for e in events].count("done") == 1
    assert recovery < 90


def test_batch_mates_messages_are_acked_by_the_parent_and_shown_in_flower(echo_stack: Stack) -> None:
    """The messages of jobs a batch-mate already ran never reach the pool child (tasks.parent_gate):
    Flower shows them succeeded without a start, and the queue ends empty. The parent takes
    messages off the broker while its child is busy (it holds them back from the child), so
    no pile of finished jobs' messages is left to work through when the child's task ends."""
    client = redis.Redis.from_url(echo_stack.redis_url)
    blocker = echo_stack.submit(SLOW_TRIGGER, n=3)  # three slow rows, one after the other: ~3 s
    with echo_stack.client() as api:
        eventually(
            lambda: api.get(f"/v1/jobs/{blocker}").json()["status"] == "running",
            interval=0.01,
            message="the blocker running",
        )
        jobs = [echo_stack.submit(f"mate {i}") for i in range(12)]
        eventually(
            lambda: (
                not client.llen("inferq.jobs@tiny")
                or api.get(f"/v1/jobs/{blocker}").json()["status"] != "running"
            ),
            interval=0.01,
            message="the queue empty or the blocker ended",
        )
        assert api.get(f"/v1/jobs/{blocker}").json()["status"] == "running"  # queue empty before it ended
    results = [echo_stack.wait_job(j) for j in jobs]
    echo_stack.wait_job(blocker)
    assert all(res["status"] == "succeeded" for res in results)
    assert max(res["engine_rows"] for res in results) > 1

    def flower_tasks() -> dict:
        return dict(httpx.get(f"{echo_stack.flower_url}/api/tasks", timeout=5).json())

    def all_succeeded() -> dict | None:
        tasks = flower_tasks()
        return tasks if all(tasks.get(j, {}).get("state") == "SUCCESS" for j in jobs) else None

    tasks = eventually(
        all_succeeded,
        timeout=20,
        interval=0.3,
        message=lambda: f"SUCCESS in Flower: { {j: flower_tasks().get(j) for j in jobs} }",
    )
    assert all(tasks[j]["state"] == "SUCCESS" for j in jobs)
    # each shows its own run time (from its record), not the 0 ms of a message acked unrun,
    # and its model and lane
    assert all(tasks[j]["runtime"] and tasks[j]["runtime"] > 0 for j in jobs), {j: tasks[j] for j in jobs}
    assert all("'lane': 'inferq.jobs@tiny'" in tasks[j]["kwargs"] for j in jobs), tasks[jobs[0]]
    acked_in_parent = [j for j in jobs if tasks[j]["started"] is None]
    assert len(acked_in_parent) >= 3, {j: tasks[j] for j in jobs}
    assert client.llen("inferq.jobs@tiny") == 0


def test_a_ready_job_whose_message_is_gone_still_runs(echo_stack: Stack) -> None:
    """The broker keeps no copy of a fetched message (celeryconfig: no ack emulation), so a
    worker parent that dies holding messages leaves their jobs in the ready lists with
    nothing to wake a worker. An idle worker child that sees such a lane sends a message
    itself (tasks.child `wake_unwoken`): the job runs. Here the message is taken off the
    broker before any worker fetches it, and ids of ended jobs met on the way leave."""
    client = redis.Redis.from_url(echo_stack.redis_url, decode_responses=True)
    lane = "inferq.jobs@tiny"
    with echo_stack.client() as api:
        ended = echo_stack.submit("ended before it ran")
        api.post(f"/v1/jobs/{ended}/cancel")
    store = JobStore(client, 600)
    request = ChatCompletionRequest.model_validate(
        {"model": "tiny", "messages": [{"role": "user", "content": "no message"}], "max_tokens": 4}
    )
    job_id = store.create(request, lane, prompt_tokens=3)  # a record, no message
    client.rpush(keys.ready(lane), ended, job_id)
    assert not client.llen(lane)
    assert echo_stack.wait_job(job_id)["status"] == "succeeded"
    eventually(lambda: ended not in client.lrange(keys.ready(lane), 0, -1), message="the ended id gone")
