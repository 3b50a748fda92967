"""Seeing what the system does: /metrics against the jobs actually run, the true queue depth
under a backlog, Flower's view of a cancelled job, the audit log, job listing, and
`inferq status --json`. A stack of its own (the real engine), so no other test's jobs move
its counters."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from core import keys
from tests.support import ROOT, procs
from tests.support.stack import Stack, fresh_db, stack_env, start_stack
from tests.support.wait import eventually

LANE = "inferq.jobs"  # the label and the job's `lane`; the model is a label of its own
FULL_LANE = "inferq.jobs@tiny"  # the Celery queue (core.lanes), as /status and Flower name it


@pytest.fixture(scope="module")
def obs(redis_url: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("observe-home")
    env = stack_env(fresh_db(redis_url, 5), demo_model, home, INFERQ_AUDIT_LOG=str(home / "audit.log"))
    st = start_stack(env, home)
    yield st
    st.sup.stop_all()


def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics by (name, sorted labels)."""
    resp = httpx.get(f"{stack.base_url}/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: dict, name: str, **labels: str) -> float:
    """A series' value; a per-lane series is the stack's model's ("tiny") unless named."""
    if "lane" in labels:
        labels.setdefault("model", "tiny")
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_status(stack: Stack, job_id: str, wanted: str, timeout: float = 60) -> None:
    with stack.client() as c:

        def status() -> str:
            return str(c.get(f"/v1/jobs/{job_id}").json()["status"])

        eventually(lambda: status() == wanted, timeout=timeout, interval=0.02, message=status)


def record_times(stack: Stack, job_id: str) -> dict[str, float]:
    """A job record's times as the store keeps them: to the microsecond."""
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        raw = cast(dict[str, str], client.hgetall(keys.job(job_id)))
    finally:
        client.close()
    return {k: float(raw[k]) for k in ("created_at", "started_at", "finished_at")}


def audit_lines(stack: Stack, ids: set[str]) -> dict[str, dict]:
    path = Path(stack.env["INFERQ_AUDIT_LOG"])
    found = {}
    for text in path.read_text().splitlines():
        line = json.loads(text)
        if line["job_id"] in ids:
            found[line["job_id"]] = line
    return found


def test_metrics_move_by_exactly_the_jobs_run(obs: Stack) -> None:
    before = scrape(obs)
    blocker = obs.submit("hold the worker", max_tokens=1900, temperature=1.0)
    wait_status(obs, blocker, "running")
    jobs = [obs.submit(f"short {i} " * (1 + i), max_tokens=4 + i) for i in range(10)]

    # the true depth, from the job store: the worker parent prefetches (holds) these
    # messages, so the broker's list is shorter than the backlog
    during = scrape(obs)
    assert sample(during, "inferq_queue_depth", lane=LANE, model="tiny") == 10
    status = procs.run(
        [sys.executable, "-m", "cli.main", "status", "--json", "--url", obs.base_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["lanes"][FULL_LANE]["depth"] == 10
    assert [w["model"] for w in state["workers"]] == ["tiny"]

    with obs.client() as c:
        assert c.post(f"/v1/jobs/{blocker}/cancel").status_code == 200
    results = [obs.wait_job(j) for j in [blocker, *jobs]]
    assert results[0]["status"] == "cancelled" and all(r["status"] == "succeeded" for r in results[1:])
    after = scrape(obs)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert sample(after, "inferq_queue_depth", lane=LANE) == 0
    assert delta("inferq_jobs_finished_total", lane=LANE, status="succeeded") == 10
    assert delta("inferq_jobs_finished_total", lane=LANE, status="cancelled") == 1
    assert delta("inferq_jobs_finished_total", lane=LANE, status="failed") == 0
    for hist in (
        "inferq_job_queue_wait_seconds",
        "inferq_job_run_seconds",
        "inferq_time_to_first_token_seconds",
    ):
        assert delta(f"{hist}_count", lane=LANE) == 11, hist
        assert delta(f"{hist}_bucket", lane=LANE, le="+Inf") == 11, hist
    # the backlog waited at least as long as the blocker ran before its cancel; measured on
    # the records' own times (the public job shows whole seconds)
    times = [record_times(obs, j) for j in [blocker, *jobs]]
    waits = [t["started_at"] - t["created_at"] for t in times[1:]]
    assert delta("inferq_job_queue_wait_seconds_sum", lane=LANE) == pytest.approx(
        sum(waits) + times[0]["started_at"] - times[0]["created_at"], abs=0.05
    )
    usage = [r["result"]["usage"] for r in results]
    assert delta("inferq_generated_tokens_total", lane=LANE) == sum(u["completion_tokens"] for u in usage)
    assert delta("inferq_prompt_tokens_total", lane=LANE) == sum(u["prompt_tokens"] for u in usage)
    assert delta("inferq_engine_batch_rows_sum") == 11  # every row of every engine call, once
    assert delta("inferq_engine_batch_rows_count") >= 2
    assert sample(after, "inferq_workers", model="tiny") == 1
    assert any(name == "inferq_worker_busy_ratio" for name, _ in after)
    http = [k for k in after if k[0] == "http_requests_total" and ("handler", "/v1/jobs") in k[1]]
    assert http, "HTTP metrics by route"

    # Flower: a cancelled job is not a green success, a finished one shows its own run time
    def flower_tasks() -> dict:
        return dict(httpx.get(f"{obs.flower_url}/api/tasks", timeout=5).json())

    def revoked() -> dict | None:
        tasks = flower_tasks()
        return tasks if tasks.get(blocker, {}).get("state") == "REVOKED" else None

    tasks = eventually(
        revoked, timeout=20, interval=0.3, message=lambda: f"REVOKED in Flower: {flower_tasks().get(blocker)}"
    )
    assert tasks[blocker]["state"] == "REVOKED", tasks.get(blocker)
    assert (
        f"'lane': '{FULL_LANE}'" in tasks[blocker]["kwargs"] and "'model': 'tiny'" in tasks[blocker]["kwargs"]
    )

    # the audit log: one line per finished job, its facts, no text
    lines = audit_lines(obs, {blocker, *jobs})
    assert set(lines) == {blocker, *jobs}
    first = lines[jobs[0]]
    assert first["status"] == "succeeded" and first["model"] == "tiny" and first["lane"] == LANE
    assert first["prompt_tokens"] == results[1]["result"]["usage"]["prompt_tokens"]
    assert first["completion_tokens"] == results[1]["result"]["usage"]["completion_tokens"]
    assert first["attempts"] == 1 and first["key"] is None
    assert first["queue_wait_s"] == pytest.approx(waits[0], abs=0.01)
    assert first["run_s"] == pytest.approx(times[1]["finished_at"] - times[1]["started_at"], abs=0.01)
    assert lines[blocker]["status"] == "cancelled"
    assert all("messages" not in line and "output" not in line for line in lines.values())


def test_every_response_says_its_processing_time(obs: Stack) -> None:
    resp = httpx.get(f"{obs.base_url}/v1/models", timeout=10)
    assert float(resp.headers["x-process-time"]) >= 0
    assert resp.headers["server-timing"].startswith("app;dur=")


def test_metrics_from_another_host_need_the_metrics_token(obs: Stack) -> None:
    """Loopback is open; what is not loopback needs INFERQ_METRICS_TOKEN (unit-level: the
    stack only listens on loopback)."""
    from starlette.requests import Request

    from api.errors import APIError
    from api.routes.observe import check_access

    def request(host: str, auth: str = "") -> Request:
        headers = [(b"authorization", auth.encode())] if auth else []
        return Request({"type": "http", "client": (host, 1234), "headers": headers})

    check_access(request("127.0.0.1"), "")
    check_access(request("10.0.0.7", "Bearer s3cret"), "s3cret")
    for host, auth, token in (("10.0.0.7", "", ""), ("10.0.0.7", "Bearer wrong", "s3cret")):
        with pytest.raises(APIError) as err:
            check_access(request(host, auth), token)
        assert err.value.status == 401


def test_list_jobs_newest_first_with_cursor_and_filters(obs: Stack) -> None:
    tag = uuid.uuid4().hex
    with obs.client() as c:
        ids = []
        for i in range(7):
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"list {i}"}],
                "max_tokens": 2,
                "metadata": {"tag": tag, "parity": "even" if i % 2 == 0 else "odd"},
            }
            ids.append(c.post("/v1/jobs", json=body).json()["id"])
        for j in ids:
            obs.wait_job(j)
        pages, after = [], None
        while True:
            params: dict[str, str | int] = {"metadata[tag]": tag, "limit": 3}
            if after:
                params["after"] = after
            page = c.get("/v1/jobs", params=params).json()
            assert page["object"] == "list"
            pages.append([j["id"] for j in page["data"]])
            if not page["has_more"]:
                break
            after = page["last_id"]
        seen = [j for p in pages for j in p]
        assert seen == ids[::-1], pages  # newest first, each once
        assert [len(p) for p in pages[:2]] == [3, 3]
        odd = c.get("/v1/jobs", params={"metadata[tag]": tag, "metadata[parity]": "odd"}).json()["data"]
        assert [j["id"] for j in odd] == [ids[5], ids[3], ids[1]]
        assert all(j["metadata"]["parity"] == "odd" and j["lane"] == LANE for j in odd)
        done = c.get("/v1/jobs", params={"metadata[tag]": tag, "status": "succeeded"}).json()["data"]
        assert len(done) == 7
        assert c.get("/v1/jobs", params={"metadata[tag]": tag, "status": "queued"}).json()["data"] == []
        other = c.get("/v1/jobs", params={"metadata[tag]": tag, "lane": "inferq.interactive"}).json()
        assert other["data"] == []
        bad: list[tuple[dict[str, str | int], str]] = [
            ({"status": "bogus"}, "status"),
            ({"lane": "nope"}, "lane"),
            ({"after": "job_unknown"}, "after"),
            ({"limit": 0}, "limit"),
        ]
        for bad_params, field in bad:
            resp = c.get("/v1/jobs", params=bad_params)
            assert resp.status_code == 400, (bad_params, resp.text)
            assert resp.json()["error"]["param"] == field, resp.json()
