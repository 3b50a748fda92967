"""The lease reaper on a real Valkey/Redis: a lapsed job is sent again, and one job that
cannot be sent (found when a job's queue was unknown to Celery) neither stops the others
nor the heartbeat thread, which would make the worker vanish from /ready."""

import time

import pytest
import redis

from core import keys
from core.config import Settings
from core.jobs import JobStore
from schemas.jobs import JobStatus
from schemas.openai import ChatCompletionRequest
from tests.conftest import with_db
from workers import lifecycle
from workers.fake import EchoEngine


def _req() -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )


def test_reaper_survives_a_job_it_cannot_send(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = with_db(redis_url, 12)  # apart from the test stacks' workers, whose reapers would race ours
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    store = JobStore(r, ttl=100)
    bad = store.create(_req(), "inferq.nowhere", 3)
    good = store.create(_req(), "inferq.jobs", 3)
    for job_id in (bad, good):
        assert store.transition(job_id, JobStatus.RUNNING, lease_s=0.05).ok
    time.sleep(0.1)
    sent: list[tuple[str, str]] = []

    def resend(job_id: str, queue: str) -> None:
        if queue == "inferq.nowhere":
            raise KeyError(queue)  # what Celery raises for a queue it does not know
        sent.append((job_id, queue))

    monkeypatch.setattr(lifecycle, "_resend", resend)
    settings = Settings(redis_url=url, heartbeat_interval_s=0.05, reap_interval_s=0.05)
    state = lifecycle.WorkerState(settings, EchoEngine("echo"))
    try:
        state.start()
        deadline = time.monotonic() + 5
        while (good, "inferq.jobs") not in sent and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (good, "inferq.jobs") in sent
        r.delete(keys.worker(state.worker_id))
        time.sleep(0.3)  # the heartbeat thread is still alive after the failing job
        assert r.exists(keys.worker(state.worker_id))
    finally:
        state.stop()
        r.zrem(keys.LEASES, bad, good)
