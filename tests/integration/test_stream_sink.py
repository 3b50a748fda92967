"""The worker child's token sink on a real Valkey, without a worker: one command writes each
flush's token events, in order, and a reset follows the tokens it voids."""

import threading
import uuid
from typing import Any, cast

import redis

from core import keys
from workers.streaming import StreamSink, Target


def test_flush_writes_one_token_event_per_job_in_one_command(r: redis.Redis) -> None:
    jobs = [f"unit-{uuid.uuid4().hex}" for _ in range(4)]
    # the third job's stream is gone (its job expired); the fourth runs again elsewhere
    for j, attempts in ((jobs[0], 1), (jobs[1], 3), (jobs[3], 2)):
        r.xadd(keys.job_events(j), {"type": "status"})
        r.expire(keys.job_events(j), 100)
        r.hset(keys.job(j), "attempts", attempts)  # the job's current attempt (the fence)
        r.expire(keys.job(j), 100)
    targets = [Target(jobs[0], 0), Target(jobs[1], 2, attempt=3), Target(jobs[2], 0), Target(jobs[3], 0)]
    sink = StreamSink(r, targets)
    sink.on_delta(0, "Hel")  # the first delta goes out at once (time to first token)
    sink.on_delta(1, "a")  # the others wait for the flush period ...
    sink.on_delta(0, "lo")
    sink.on_delta(2, "x")
    sink.on_delta(3, "late")  # attempt 1 of a job on its attempt 2: fenced off
    sink.flush()  # ... and go out together
    sink.wait_written()  # written by the writer thread by now

    def events(job: str) -> list[dict[str, str]]:
        return [dict(fields) for _, fields in cast(list[Any], r.xrange(keys.job_events(job)))][1:]

    assert events(jobs[0]) == [
        {"type": "token", "index": "0", "text": "Hel", "attempt": "1"},
        {"type": "token", "index": "0", "text": "lo", "attempt": "1"},
    ]
    assert events(jobs[1]) == [{"type": "token", "index": "2", "text": "a", "attempt": "3"}]
    assert not r.exists(keys.job_events(jobs[2]))  # not re-created without a TTL
    assert events(jobs[3]) == []
    assert 0 < r.ttl(keys.job_events(jobs[0])) <= 100
    sink.flush()  # nothing pending: nothing written
    sink.wait_written()
    assert len(events(jobs[0])) == 2
    sink.stop()


def test_writer_keeps_order_and_a_reset_follows_the_tokens_it_voids(r: redis.Redis) -> None:
    job = f"unit-{uuid.uuid4().hex}"
    r.xadd(keys.job_events(job), {"type": "status"})
    r.expire(keys.job_events(job), 100)
    r.hset(keys.job(job), "attempts", 1)
    r.expire(keys.job(job), 100)
    sink = StreamSink(r, [Target(job, 0)], flush_interval_s=0)  # every delta flushes
    for k in range(50):
        sink.on_delta(0, f"{k},")
    sink.on_reset(0)  # no drain before: on_reset waits for the tokens itself
    fields = [dict(f) for _, f in cast(list[Any], r.xrange(keys.job_events(job)))][1:]
    assert "".join(f["text"] for f in fields[:-1]) == "".join(f"{k}," for k in range(50))
    assert fields[-1]["type"] == "reset"
    sink.stop()


def test_flushes_that_queue_behind_a_write_go_as_one(r: redis.Redis) -> None:
    """Rows that end one by one each flush; while a write is out, the flushes behind it wait
    and then go together, one script call, their events still in order."""
    jobs = [f"unit-{uuid.uuid4().hex}" for _ in range(5)]
    for j in jobs:
        r.xadd(keys.job_events(j), {"type": "status"})
        r.expire(keys.job_events(j), 100)
        r.hset(keys.job(j), "attempts", 1)
        r.expire(keys.job(j), 100)
    sink = StreamSink(r, [Target(j, 0) for j in jobs])
    script, out, release = sink._xadd_tokens, threading.Event(), threading.Event()
    calls: list[int] = []

    def slow_first(keys: list[str], args: list[Any]) -> Any:
        calls.append(len(keys) // 2)
        if len(calls) == 1:
            out.set()
            release.wait(10)  # the first write is slow to come back
        return script(keys=keys, args=args)

    sink._xadd_tokens = slow_first  # type: ignore[assignment]
    sink.on_delta(0, "first")
    sink.flush()
    assert out.wait(10)
    for i in range(1, 5):  # four rows end while the first write is out
        sink.on_delta(i, f"row {i}")
        sink.flush()
    sink.on_delta(4, " more")
    sink.flush()
    release.set()
    sink.wait_written()
    assert calls == [1, 5]  # the five flushes behind the first: one call

    def texts(job: str) -> list[str]:
        return [dict(f)["text"] for _, f in cast(list[Any], r.xrange(keys.job_events(job)))[1:]]

    assert [texts(j) for j in jobs] == [["first"], ["row 1"], ["row 2"], ["row 3"], ["row 4", " more"]]
    sink.stop()
