"""Filling a batch (workers.claim) and the batched store calls it relies on, on a real
Valkey/Redis: which ready jobs join, and what happens to the ones that don't."""

import threading
import time
from collections.abc import Iterator
from typing import cast

import pytest
import redis

from core import keys
from core.jobs import JobRecord, JobStore, Move
from schemas.jobs import JobStatus
from schemas.openai import ChatCompletionRequest
from workers.claim import claim_more, closest_by_length
from workers.fake import EchoEngine
from workers.runner import RunOptions, run_batch

LANE = "inferq.test-claim"


@pytest.fixture(autouse=True)
def _clean(r: redis.Redis) -> Iterator[None]:
    """Leave no lease behind: a worker's reaper sharing this server would send these jobs."""
    r.delete(keys.ready(LANE))
    yield
    leased = cast(list[str], r.zrange(keys.LEASES, 0, -1))
    ours = [j for j in leased if r.hget(keys.job(j), "queue") == LANE]
    if ours:
        r.zrem(keys.LEASES, *ours)
    r.delete(keys.ready(LANE))


def _req(n: int = 1, temperature: float = 0.0) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {
            "model": "echo",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "n": n,
            "temperature": temperature,
        }
    )


def _enqueue(store: JobStore, tokens: list[int], **kw: float) -> list[str]:
    ids = []
    for t in tokens:
        job_id = store.create(_req(**kw), LANE, prompt_tokens=t)  # type: ignore[arg-type]
        store.r.rpush(keys.ready(LANE), job_id)
        ids.append(job_id)
    return ids


def _ready(r: redis.Redis) -> list[str]:
    return cast(list[str], r.lrange(keys.ready(LANE), 0, -1))


def _record(store: JobStore, job_id: str) -> JobRecord:
    rec = store.get(job_id)
    assert rec is not None
    return rec


def test_closest_by_length_prefers_near_lengths_and_counts_rows(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    ids = _enqueue(store, [100, 12, 9, 50, 11])
    recs = store.get_many(ids)
    assert all(recs)
    chosen = closest_by_length(10, [x for x in recs if x], 3)
    assert [c.prompt_tokens for c in chosen] == [12, 9, 11]  # the 3 closest, in arrival order
    wide = store.create(_req(n=3), LANE, prompt_tokens=10)
    picked = closest_by_length(10, [_record(store, wide), *[x for x in recs if x]], 2)
    assert [c.job.id for c in picked] == [ids[2], ids[4]]  # n=3 does not fit in 2 rows


def test_claim_takes_closest_lengths_and_puts_the_rest_back_in_order(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    first_id = store.create(_req(), LANE, prompt_tokens=10)
    ids = _enqueue(store, [90, 11, 80, 9, 70, 10, 60, 95])
    store.transition(first_id, JobStatus.RUNNING, lease_s=30)
    opts = RunOptions(max_batch_size=4, lanes=(LANE,), length_window=4, lease_s=30)
    claimed = claim_more(store, _record(store, first_id), opts, 1, lambda rec: True)
    assert sorted(c.prompt_tokens for c in claimed) == [9, 10, 11]
    assert all(_record(store, c.job.id).status is JobStatus.RUNNING for c in claimed)
    # all 8 were looked at (3 free rows x 4 > 8); the others are back at the head, in order
    assert _ready(r) == [ids[0], ids[2], ids[4], ids[6], ids[7]]


def test_claim_with_window_one_is_arrival_order(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    first_id = store.create(_req(), LANE, prompt_tokens=10)
    ids = _enqueue(store, [90, 11, 80, 9])
    opts = RunOptions(max_batch_size=3, lanes=(LANE,), length_window=1, lease_s=30)
    claimed = claim_more(store, _record(store, first_id), opts, 1, lambda rec: True)
    assert [c.job.id for c in claimed] == ids[:2]
    assert _ready(r) == ids[2:]


def test_claim_leaves_incompatible_and_drops_finished(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    first_id = store.create(_req(), LANE, prompt_tokens=10)
    hot = _enqueue(store, [10], temperature=0.7)
    done = _enqueue(store, [10])
    store.transition(done[0], JobStatus.CANCELLED)
    ok = _enqueue(store, [10])
    opts = RunOptions(max_batch_size=4, lanes=(LANE,), length_window=4, lease_s=30)
    first = _record(store, first_id)
    same = first.request.temperature

    claimed = claim_more(store, first, opts, 1, lambda rec: rec.request.temperature == same)
    assert [c.job.id for c in claimed] == ok
    assert _ready(r) == hot  # the cancelled job's id is gone; its own message ends it


def test_apply_runs_many_moves_in_one_call(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    a, b = (store.create(_req(), LANE, 5) for _ in range(2))
    res = store.apply([Move(a, JobStatus.RUNNING, lease_s=5), Move(b, JobStatus.SUCCEEDED)])
    assert res[0].ok and not res[1].ok and res[1].previous == "queued"
    assert store.status(a) is JobStatus.RUNNING and store.status(b) is JobStatus.QUEUED
    assert store.status("job_missing") is None
    assert store.apply([]) == []


def test_batch_finishes_every_job_and_skips_their_later_messages(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    ids = _enqueue(store, [3, 4, 5, 6])
    first = cast(str, r.lpop(keys.ready(LANE)))
    opts = RunOptions(max_batch_size=4, lanes=(LANE,), length_window=2, lease_s=30)
    outcomes = run_batch(first, store, EchoEngine("echo"), opts)
    assert [o.status for o in outcomes] == [JobStatus.SUCCEEDED] * 4
    assert {_record(store, j).job.batch_size for j in ids} == {4}
    # each job's own message arrives later and finds it finished
    assert [o.skipped for o in run_batch(ids[2], store, EchoEngine("echo"), opts)] == [True]


def test_collect_waits_once_for_a_lone_job_and_longer_for_a_burst(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    opts = RunOptions(max_batch_size=6, lanes=(LANE,), collect_s=0.05, collect_max_s=3.0, lease_s=30)
    lone = _record(store, store.create(_req(), LANE, prompt_tokens=5))
    t0 = time.monotonic()
    assert claim_more(store, lone, opts, 1, lambda rec: True) == []
    assert time.monotonic() - t0 < 1.0  # one collect window, not collect_max_s

    first = _record(store, store.create(_req(), LANE, prompt_tokens=5))

    def burst() -> None:  # a client still submitting: one job every 20 ms
        for _ in range(5):
            time.sleep(0.02)
            _enqueue(store, [5])

    feeder = threading.Thread(target=burst)
    feeder.start()
    claimed = claim_more(store, first, opts, 1, lambda rec: True)
    feeder.join()
    assert len(claimed) == 5  # the batch waited for the burst and is full


def test_jobs_left_during_collect_go_back_once_in_order(r: redis.Redis) -> None:
    """A job the batch cannot take is held while the batch waits, not popped and pushed back
    on every wait (which hid the jobs arriving behind it), and returns to the head."""
    store = JobStore(r, ttl=100)
    opts = RunOptions(max_batch_size=3, lanes=(LANE,), collect_s=0.05, collect_max_s=3.0, lease_s=30)
    first = _record(store, store.create(_req(), LANE, prompt_tokens=5))
    hot = _enqueue(store, [5, 5], temperature=0.7)

    def late() -> None:
        for _ in range(2):
            time.sleep(0.02)
            _enqueue(store, [5])

    feeder = threading.Thread(target=late)
    feeder.start()
    claimed = claim_more(store, first, opts, 1, lambda rec: rec.request.temperature == 0.0)
    feeder.join()
    assert len(claimed) == 2
    assert _ready(r) == hot
