"""Routing by model: two base models on one Redis and one API, each job run only by a worker
of its own model; /v1/models counts each model's workers; a model nobody serves any more
answers 503 model_unavailable with Retry-After (its batch lines still queue), one never
served 404. The second model's worker joins the echo stack (echo engine, model "tiny-b")
for this module only: its lanes are its own, so the stack's other tests do not see it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest
import redis

from cli.processes import worker_argv
from core import keys
from tests.support import ROOT
from tests.support.stack import Stack, worker_lanes
from tests.support.wait import eventually

OTHER = "tiny-b"


def _workers_by_model(r: redis.Redis) -> dict[str, str]:  # decode_responses
    """worker id -> its model, from the live heartbeats."""
    out = {}
    for wid in cast(list[str], r.zrange(keys.WORKERS, 0, -1)):
        raw = r.get(keys.worker(wid))
        if raw:
            out[wid] = str(json.loads(raw)["model"])
    return out


def _models(c: httpx.Client) -> dict[str, int]:
    return {m["id"]: m.get("workers") for m in c.get("/v1/models").json()["data"]}


def _create_batch(c: httpx.Client, lines: list[dict[str, Any]]) -> str:
    """An OpenAI batch of `lines`, uploaded and created; its id."""
    data = "\n".join(json.dumps(line) for line in lines).encode()
    f = c.post("/v1/files", files={"file": ("lines.jsonl", data)}, data={"purpose": "batch"}).json()
    body = {"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    return str(c.post("/v1/batches", json=body).json()["id"])


def _completed(c: httpx.Client, batch_id: str, message: str) -> dict[str, Any]:
    """The batch once completed."""
    return dict(
        eventually(
            lambda: (b := c.get(f"/v1/batches/{batch_id}").json())["status"] == "completed" and b,
            timeout=60,
            interval=0.2,
            message=message,
        )
    )


@pytest.fixture(scope="module")
def fleet(echo_stack: Stack) -> Iterator[Stack]:
    """The echo stack with a worker of a second base model beside its own."""
    env = {**echo_stack.env, "INFERQ_SERVED_MODEL_NAME": OTHER}
    with echo_stack.log.open("ab") as log:
        echo_stack.sup.start(
            "worker-b",
            worker_argv(worker_lanes(env), name="inferq-b@%h"),
            env=env,
            cwd=ROOT,
            stdout=log.fileno(),
        )
    with echo_stack.client() as c:
        eventually(lambda: _models(c).get(OTHER) == 1, timeout=60, interval=0.2, message="tiny-b served")
    yield echo_stack
    echo_stack.sup.stop("worker-b")
    with echo_stack.client() as c:  # the stack's other tests see one worker again
        eventually(lambda: OTHER not in _models(c), timeout=30, interval=0.2, message="tiny-b gone")


def test_each_job_runs_on_a_worker_of_its_own_model(fleet: Stack) -> None:
    r = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
    owners = _workers_by_model(r)
    assert sorted(owners.values()) == ["tiny", OTHER], owners
    with fleet.client() as c:
        assert _models(c) == {"tiny": 1, OTHER: 1}
        ids = {
            c.post(
                "/v1/jobs",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": f"{model} {i}"}],
                    "max_tokens": 4,
                },
            ).json()["id"]: model
            for i in range(6)
            for model in ("tiny", OTHER)
        }
    for job_id, model in ids.items():
        job = fleet.wait_job(job_id)
        assert job["status"] == "succeeded" and job["model"] == model
        assert job["lane"] == "inferq.jobs"  # the queue; the model picks which one's
        worker = cast(str | None, r.hget(keys.job(job_id), "worker"))
        assert worker is not None and owners[worker] == model, (job_id, model, owners)
    metrics = httpx.get(f"{fleet.base_url}/metrics").text
    assert f'inferq_workers{{model="{OTHER}"}} 1.0' in metrics
    assert f'inferq_queue_depth{{lane="inferq.jobs",model="{OTHER}"}} 0.0' in metrics
    assert f'inferq_jobs_finished_total{{lane="inferq.jobs",model="{OTHER}",status="succeeded"}}' in metrics


def test_a_batch_routes_each_line_to_its_model(fleet: Stack) -> None:
    lines = [
        {
            "custom_id": f"{model}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"line {i}"}], "max_tokens": 3},
        }
        for i in range(3)
        for model in ("tiny", OTHER)
    ]
    with fleet.client() as c:
        done = _completed(c, _create_batch(c, lines), "the batch completed")
        assert done["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
        out = c.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()
    models = {json.loads(line)["custom_id"]: json.loads(line)["response"]["body"]["model"] for line in out}
    assert models == {f"{m}-{i}": m for i in range(3) for m in ("tiny", OTHER)}


def test_a_model_nobody_serves_any_more_is_unavailable_not_stuck(fleet: Stack) -> None:
    fleet.sup.stop("worker-b")
    body = {"model": OTHER, "messages": [{"role": "user", "content": "anyone?"}], "max_tokens": 3}
    with fleet.client() as c:
        eventually(
            lambda: OTHER not in _models(c), timeout=30, interval=0.2, message="tiny-b gone from /v1/models"
        )
        started = time.monotonic()
        refused = c.post("/v1/jobs", json=body)
        assert time.monotonic() - started < 2  # answered, not held
        assert refused.status_code == 503, refused.text
        err = refused.json()["error"]
        assert err["code"] == "model_unavailable" and err["param"] == "model" and OTHER in err["message"]
        assert int(refused.headers["retry-after"]) > 0
        chat = c.post("/v1/chat/completions", json=body)
        assert chat.status_code == 503 and chat.json()["error"]["code"] == "model_unavailable"
        assert c.get(f"/v1/models/{OTHER}").json()["workers"] == 0  # known, served by none now
        never = c.post("/v1/jobs", json={**body, "model": "never-served"})
        assert never.status_code == 404 and never.json()["error"]["code"] == "model_not_found"
        assert "'tiny'" in never.json()["error"]["message"]  # says what is served
        # a batch line waits for a worker instead (its window bounds the wait), then runs
        line = {"custom_id": "late", "method": "POST", "url": "/v1/chat/completions", "body": body}
        batch_id = _create_batch(c, [line])
        eventually(
            lambda: c.get(f"/v1/batches/{batch_id}").json()["status"] == "in_progress",
            timeout=30,
            interval=0.1,
            message="the batch in progress",
        )
        fleet.sup.restart("worker-b")  # a worker of the model comes back: the line runs
        done = _completed(c, batch_id, "the waiting line run once tiny-b is back")
        assert done["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
