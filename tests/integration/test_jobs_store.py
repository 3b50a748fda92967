"""The job record and state machine on a real Valkey/Redis, and the runner with the fake engine."""

from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis

from core import keys, scripts
from core.job_store import JobStore, Move
from schemas.jobs import JobError, JobStatus
from schemas.openai import ChatCompletionRequest
from tests.support.stack import with_db
from tests.support.wait import eventually
from workers.engines.echo import FAIL_TRIGGER, EchoEngine
from workers.runner import run_job
from workers.streaming import StreamSink, Target


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A database of its own: the test stacks' workers reap dead workers in theirs every 2 s,
    and one of them took this module's lapsed job before the test could see it (a CI flake)."""
    client = redis.Redis.from_url(with_db(redis_url, 11), decode_responses=True)
    yield client
    client.close()


def _req(text: str = "one two three", **kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": text}], "max_tokens": 16, **kw}
    )


def _statuses(r: redis.Redis, job_id: str) -> list[str]:
    events: list[tuple[str, dict[str, str]]] = r.xrange(keys.job_events(job_id))  # type: ignore[assignment]
    return [fields["status"] for _, fields in events if fields["type"] == "status"]


def _types(r: redis.Redis, job_id: str) -> list[str]:
    events: list[tuple[str, dict[str, str]]] = r.xrange(keys.job_events(job_id))  # type: ignore[assignment]
    return [fields["type"] for _, fields in events]


def test_create_sets_ttl_and_first_event(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    job_id = store.create(_req(), "q", prompt_tokens=5)
    assert 0 < r.ttl(keys.job(job_id)) <= 100
    assert 0 < r.ttl(keys.job_events(job_id)) <= 100
    rec = store.get(job_id)
    assert rec is not None and rec.status is JobStatus.QUEUED and rec.lane == "q"
    assert _statuses(r, job_id) == ["queued"]


def test_transitions_follow_the_machine(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    job_id = store.create(_req(), "q", 5)
    assert not store.transition(job_id, JobStatus.SUCCEEDED).ok  # queued -> succeeded is not a move
    worker = "test-store:1"
    r.set(keys.worker(worker), "{}", px=200)
    assert store.transition(job_id, JobStatus.RUNNING, worker=worker).ok
    held = store.transition(job_id, JobStatus.RUNNING, worker="other:2")  # its worker beats
    assert not held.ok and held.alive
    assert r.lrange(keys.processing(worker), 0, -1) == [job_id]
    # the worker stops beating: it died
    eventually(lambda: not r.exists(keys.worker(worker)), timeout=10, interval=0.02, message="beat lapsed")
    assert store.transition(job_id, JobStatus.RUNNING, worker="other:2").ok  # a redelivery runs it
    assert r.lrange(keys.processing(worker), 0, -1) == []
    assert r.lrange(keys.processing("other:2"), 0, -1) == [job_id]
    done = store.transition(job_id, JobStatus.FAILED, error=JobError(code="x", message="boom"))
    assert done.ok and done.previous == "running"
    again = store.transition(job_id, JobStatus.SUCCEEDED)
    assert not again.ok and again.previous == "failed"
    assert r.lrange(keys.processing("other:2"), 0, -1) == []  # a finished job is nobody's
    rec = store.get(job_id)
    assert rec is not None
    assert rec.job.attempts == 2 and rec.job.error is not None and rec.job.error.code == "x"
    assert rec.job.started_at and rec.job.finished_at and rec.job.finished_at >= rec.job.started_at
    assert _statuses(r, job_id) == ["queued", "running", "running", "failed"]
    # a redelivery announces itself with `reset`; a failure ends with an `error` event
    assert _types(r, job_id) == ["status", "status", "reset", "status", "status", "error"]


def test_a_cut_off_worker_is_fenced_once_its_job_runs_again(r: redis.Redis) -> None:
    """Worker A loses Redis past its heartbeat while generating; B runs the job again
    (attempt 2). When A comes back, its tokens and its result carry attempt 1: both are
    refused, so the stream holds no text of A's after B started and the job ends once, B's.
    Without the fence A's late `succeeded` was taken (the job was `running`, a legal move)."""
    store = JobStore(r, ttl=100)
    job_id = store.create(_req(), "q", 5)
    a, b = "fence-a:1", "fence-b:2"
    r.set(keys.worker(a), "{}", px=200)
    assert store.transition(job_id, JobStatus.RUNNING, worker=a).ok
    sink_a = StreamSink(r, [Target(job_id, 0, attempt=1)], background=False)
    sink_a.on_delta(0, "from A")
    sink_a.flush()
    eventually(lambda: not r.exists(keys.worker(a)), timeout=10, interval=0.02, message="A's beat lapsed")
    assert store.transition(job_id, JobStatus.RUNNING, worker=b).ok  # the reaper sent it again
    sink_a.on_delta(0, " late")  # A is back
    sink_a.flush()
    late = store.transition(job_id, JobStatus.SUCCEEDED, extra={"_attempt": "1"})
    assert not late.ok and late.fenced and late.previous == "running"
    sink_b = StreamSink(r, [Target(job_id, 0, attempt=2)], background=False)
    sink_b.on_delta(0, "from B")
    sink_b.flush()
    assert store.transition(
        job_id, JobStatus.FAILED, error=JobError(code="x", message="B's end"), extra={"_attempt": "2"}
    ).ok
    events: list[tuple[str, dict[str, str]]] = r.xrange(keys.job_events(job_id))  # type: ignore[assignment]
    assert [f["text"] for _, f in events if f["type"] == "token"] == ["from A", "from B"]
    assert _types(r, job_id).count("error") == 1 and "done" not in _types(r, job_id)
    rec = store.get(job_id)
    assert rec is not None and rec.worker == b and rec.job.error is not None
    assert rec.job.error.message == "B's end"


def test_an_end_is_announced_only_while_some_endpoint_could_hear_it(r: redis.Redis) -> None:
    """With no webhook endpoint (none made through the API, none by setting) a job that asked
    to be announced writes nothing to the webhook stream; with either, its end is there."""
    store = JobStore(r, ttl=100)
    r.delete(keys.WEBHOOK_EVENTS, keys.WEBHOOK_INDEX, keys.WEBHOOKS_CONFIGURED)

    def end_one() -> str:
        job_id = store.create(_req(), "q", 5)
        r.hset(keys.job(job_id), "notify", "job")
        assert store.transition(job_id, JobStatus.CANCELLED).ok
        return job_id

    end_one()
    assert r.xlen(keys.WEBHOOK_EVENTS) == 0
    r.sadd(keys.WEBHOOK_INDEX, "we_1")
    stored = end_one()
    r.delete(keys.WEBHOOK_INDEX)
    r.set(keys.WEBHOOKS_CONFIGURED, "1", ex=100)
    configured = end_one()
    entries: list[tuple[str, dict[str, str]]] = r.xrange(keys.WEBHOOK_EVENTS)  # type: ignore[assignment]
    assert [f["id"] for _, f in entries] == [stored, configured]
    r.delete(keys.WEBHOOK_EVENTS, keys.WEBHOOKS_CONFIGURED)


def test_moves_are_sent_without_script_checks_and_survive_a_script_flush(r: redis.Redis) -> None:
    """A call's moves are one round trip: no `SCRIPT EXISTS` before them (redis-py's pipelined
    scripts send one per pipeline); a script Redis lost (a restart, SCRIPT FLUSH) is loaded
    again and the moves still happen, once each."""

    def script_exists_calls() -> int:
        stats = r.info("commandstats")
        return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))

    store = JobStore(r, ttl=100)
    ids = [store.create(_req(), "q", 5) for _ in range(3)]
    worker = "no-checks:1"
    before = script_exists_calls()
    r.script_flush()
    assert all(d.ok for d in store.apply([Move(j, JobStatus.RUNNING, worker=worker) for j in ids]))
    assert all(d.ok for d in store.apply([Move(j, JobStatus.CANCELLED) for j in ids]))
    assert script_exists_calls() == before
    assert [_statuses(r, j) for j in ids] == [["queued", "running", "cancelled"]] * 3


def test_an_engine_calls_moves_are_one_script_call_with_their_metrics_summed(r: redis.Redis) -> None:
    """Eight jobs' moves each way are one EVALSHA, and the metrics they add land summed: one
    command per metrics field for the call, not one per job (56 for these moves before)."""
    store, lane, worker = JobStore(r, ttl=100), "lane-summed", "summed:1"
    ids = [store.create(_req(), lane, 5) for _ in range(8)]
    sent: list[str] = []
    pipeline = r.pipeline

    def spied(*args: Any, **kw: Any) -> Any:
        pipe: Any = pipeline(*args, **kw)
        evalsha = pipe.evalsha

        def counted(*a: Any) -> Any:
            sent.append(str(a[0]))
            return evalsha(*a)

        pipe.evalsha = counted
        return pipe

    def calls(command: str) -> int:
        return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    r.script_load(scripts.transition())  # loaded: no NOSCRIPT, no second send
    before = calls("hincrby") + calls("hincrbyfloat")
    r.pipeline = spied  # type: ignore[method-assign]
    assert all(d.ok for d in store.apply([Move(j, JobStatus.RUNNING, worker=worker) for j in ids]))
    tokens = {"_prompt_tokens": "5", "_completion_tokens": "3", "_attempt": "1"}
    assert all(d.ok for d in store.apply([Move(j, JobStatus.SUCCEEDED, extra=tokens) for j in ids]))
    assert len(sent) == 2  # one script call per apply
    # other tests' idle workers share this server: a margin for theirs, far below 56
    assert calls("hincrby") + calls("hincrbyfloat") - before < 24
    m = cast(dict[str, str], r.hgetall(keys.METRICS))
    assert int(m[f"depth|{lane}"]) == 0
    assert int(m[f"finished|{lane}|succeeded"]) == 8
    assert (int(m[f"prompt_tokens|{lane}"]), int(m[f"generated_tokens|{lane}"])) == (40, 24)
    for name in ("queue_wait", "run"):
        assert sum(int(v) for k, v in m.items() if k.startswith(f"h|{name}|{lane}|")) == 8
        assert float(m[f"s|{name}|{lane}"]) >= 0
    assert [_statuses(r, j) for j in ids] == [["queued", "running", "succeeded"]] * 8


def test_missing_job_is_reported(r: redis.Redis) -> None:
    res = JobStore(r, ttl=100).transition("job_nope", JobStatus.RUNNING, worker="test-store:1")
    assert res.missing and not res.ok


def test_runner_succeeds_and_redelivery_is_skipped(r: redis.Redis) -> None:
    store, engine = JobStore(r, ttl=100), EchoEngine("echo")
    job_id = store.create(_req("a b c d", n=2), "q", 5)
    assert run_job(job_id, store, engine).status is JobStatus.SUCCEEDED
    first = store.get(job_id)
    assert first is not None and first.job.result is not None
    assert [c.message.content for c in first.job.result.choices] == ["a b c d", "a b c d"]
    assert first.job.result.usage.completion_tokens == 8
    again = run_job(job_id, store, engine)  # the same message delivered twice
    assert again.skipped
    second = store.get(job_id)
    assert second is not None and second.job.result == first.job.result and second.job.attempts == 1
    assert engine.calls == [2]


def test_engine_failure_fails_only_that_job(r: redis.Redis) -> None:
    store, engine = JobStore(r, ttl=100), EchoEngine("echo")
    bad = store.create(_req(FAIL_TRIGGER), "q", 5)
    good = store.create(_req("fine"), "q", 5)
    assert run_job(bad, store, engine).status is JobStatus.FAILED
    assert run_job(good, store, engine).status is JobStatus.SUCCEEDED
    rec = store.get(bad)
    assert rec is not None and rec.job.error is not None
    assert rec.job.error.code == "engine_error" and "failure requested" in rec.job.error.message


def test_stop_and_length_are_truthful(r: redis.Redis) -> None:
    store, engine = JobStore(r, ttl=100), EchoEngine("echo")
    stopped = store.create(_req("a b STOP c", stop="STOP"), "q", 5)
    cut = store.create(_req(" ".join(["w"] * 40)), "q", 5)
    run_job(stopped, store, engine)
    run_job(cut, store, engine)
    a, b = store.get(stopped), store.get(cut)
    assert a and a.job.result and a.job.result.choices[0].finish_reason == "stop"
    assert a.job.result.choices[0].message.content == "a b "
    assert b and b.job.result and b.job.result.choices[0].finish_reason == "length"
