"""The reaper on a real Valkey/Redis: the running jobs of a worker whose heartbeat lapsed
are sent again, its queued ids go back to their lanes, and one job that cannot be sent
(found when a job's queue was unknown to Celery) neither stops the others
nor the heartbeat thread, which would make the worker vanish from /ready."""

import pytest
import redis

from core import keys
from core.config import Settings
from core.job_store import JobStore
from schemas.jobs import JobStatus
from schemas.openai import ChatCompletionRequest
from tasks import child as lifecycle
from tests.support.stack import with_db
from tests.support.wait import eventually
from workers.engines.echo import EchoEngine


def _req() -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )


def _pop_one(store: JobStore, worker: str) -> str | None:
    """The next ready "inferq.jobs" id, taken into `worker`'s processing list."""
    ids = [job_id for lane in store.recovery.pop_window(["inferq.jobs"], 1, worker) for job_id, _ in lane]
    return ids[0] if ids else None


def test_reaper_survives_a_job_it_cannot_send(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = with_db(redis_url, 12)  # apart from the test stacks' workers, whose reapers would race ours
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    store = JobStore(r, ttl=100)
    bad = store.create(_req(), "inferq.nowhere", 3)
    good = store.create(_req(), "inferq.jobs", 3)
    for job_id in (bad, good):  # running on a worker that never beat: it is dead
        assert store.transition(job_id, JobStatus.RUNNING, worker="dead-host:7").ok
    queued = store.create(_req(), "inferq.jobs", 3)
    assert _pop_one(store, "dead-host:7") is None  # the lane's list is empty...
    r.rpush(keys.ready("inferq.jobs"), queued)
    assert _pop_one(store, "dead-host:7") == queued  # ...now it took one
    sent: list[tuple[str, str]] = []

    def resend(job_id: str, queue: str, model: str) -> None:
        if queue == "inferq.nowhere":
            raise KeyError(queue)  # what Celery raises for a queue it does not know
        sent.append((job_id, queue))

    monkeypatch.setattr(lifecycle, "send_job", resend)
    settings = Settings(redis_url=url, heartbeat_interval_s=0.05, reap_interval_s=0.05)
    state = lifecycle.WorkerState(settings, EchoEngine("echo"))
    try:
        state.start()

        def failed_to_send() -> bool:  # sent in RESEND's order: `good` may go before `bad` fails
            record = store.get(bad)
            return record is not None and record.job.error is not None

        eventually(
            lambda: (good, "inferq.jobs") in sent and failed_to_send(),
            timeout=5,
            interval=0.02,
            message=lambda: f"`good` sent and `bad` failed; sent: {sent}",
        )
        assert (good, "inferq.jobs") in sent
        assert r.lrange(keys.ready("inferq.jobs"), 0, -1) == [queued]  # back on its lane
        failed = store.get(bad)  # a job that can never be sent fails, saying why
        assert (
            failed is not None and failed.job.error is not None and failed.job.error.code == "resend_failed"
        )
        assert store.recovery.pending_resends() == []
        assert not r.exists(keys.processing("dead-host:7"))
        r.delete(keys.worker(state.worker_id))
        # the heartbeat thread is still alive after the failing job: it beats again
        eventually(lambda: r.exists(keys.worker(state.worker_id)), timeout=0.3, message="a heartbeat")
    finally:
        state.stop()


def test_a_live_worker_settles_jobs_its_ended_task_left_running(redis_url: str) -> None:
    """Redis went away mid-batch: the task ended, its jobs stayed `running` on a worker that
    is alive but runs nothing, and no reaper takes a live worker's jobs. Between tasks the
    worker settles its own list: queued ids back to their lane, running jobs sent again and
    no longer its own, so their next message runs them instead of being skipped."""
    url = with_db(redis_url, 12)
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    store = JobStore(r, ttl=100)
    worker = "live-host:3"
    r.set(keys.worker(worker), "{}", ex=60)
    left = store.create(_req(), "inferq.jobs", 3)
    assert store.transition(left, JobStatus.RUNNING, worker=worker).ok
    waiting = store.create(_req(), "inferq.jobs", 3)
    r.rpush(keys.ready("inferq.jobs"), waiting)
    assert _pop_one(store, worker) == waiting
    assert store.recovery.reap() == 0  # alive: not the reaper's
    refused = store.transition(left, JobStatus.RUNNING, worker="other:9")
    assert refused.alive  # a redelivery would be skipped...
    assert store.recovery.settle(worker) == 1
    assert store.recovery.pending_resends() == [(left, "inferq.jobs")]  # durable until sent
    assert r.lrange(keys.ready("inferq.jobs"), 0, -1) == [waiting]
    record = store.get(left)
    assert record is not None and record.job.attempts == 0  # its worker did not die
    store.recovery.resent(left, "inferq.jobs")
    assert store.recovery.pending_resends() == []
    assert store.transition(left, JobStatus.RUNNING, worker="other:9").ok  # ...now it runs
    assert store.recovery.settle(worker) == 0 and not r.exists(keys.processing(worker))
