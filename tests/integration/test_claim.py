"""Filling a batch (workers.claim) and the batched store calls it relies on, on a real
Valkey/Redis: which ready jobs join, what happens to the ones that don't, and to the ones a
worker killed mid-claim had taken off the list."""

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import cast

import pytest
import redis

from core import keys
from core.config import Settings
from core.job_store import JobRecord, JobStore, Move
from schemas.jobs import JobStatus
from schemas.openai import ChatCompletionRequest
from tasks import child as lifecycle
from tests.support import ROOT, procs
from tests.support.stack import with_db
from tests.support.wait import eventually
from workers.claim import claim_more, closest_fits
from workers.engines.echo import EchoEngine
from workers.options import RunOptions, process_worker_id
from workers.runner import drain, run_call

LANE = "inferq.test-claim"


WORKER = process_worker_id()


@pytest.fixture(autouse=True)
def _clean(r: redis.Redis) -> Iterator[None]:
    """This process is the worker here: it beats while a test runs (a worker's reaper sharing
    this server would otherwise take its jobs back) and leaves nothing behind."""
    r.delete(keys.ready(LANE))
    r.set(keys.worker(WORKER), "{}", ex=60)
    yield
    r.delete(keys.ready(LANE), keys.processing(WORKER), keys.worker(WORKER))
    r.srem(keys.PROCESSING_WORKERS, WORKER)


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


def _status(store: JobStore, job_id: str) -> JobStatus:
    return _record(store, job_id).job.status


def test_closest_fits_prefers_near_lengths_and_counts_rows(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    ids = _enqueue(store, [100, 12, 9, 50, 11])
    recs = store.get_many(ids)
    assert all(recs)
    first = _record(store, store.create(_req(), LANE, prompt_tokens=10))
    chosen = closest_fits(first, [x for x in recs if x], 3)
    assert [c.prompt_tokens for c in chosen] == [12, 9, 11]  # the 3 closest, in arrival order
    wide = store.create(_req(n=3), LANE, prompt_tokens=10)
    picked = closest_fits(first, [_record(store, wide), *[x for x in recs if x]], 2)
    assert [c.job.id for c in picked] == [ids[2], ids[4]]  # n=3 does not fit in 2 rows


def test_closest_fits_prefers_near_token_limits_over_near_lengths(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)

    def make(max_tokens: int | None, prompt: int) -> JobRecord:
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
        req = ChatCompletionRequest.model_validate(body)
        return _record(store, store.create(req, LANE, prompt_tokens=prompt))

    first = make(8, 10)
    far, near_long, near, default = make(48, 10), make(9, 40), make(8, 30), make(600, 10)
    assert closest_fits(first, [far, near_long, near, default], 2) == [near_long, near]
    # no max_tokens: the server's default counts
    nolimit = make(None, 10)
    assert closest_fits(make(512, 10), [default, nolimit], 1, default_max_tokens=512) == [nolimit]


def test_claim_takes_closest_lengths_and_puts_the_rest_back_in_order(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    first_id = store.create(_req(), LANE, prompt_tokens=10)
    ids = _enqueue(store, [90, 11, 80, 9, 70, 10, 60, 95])
    store.transition(first_id, JobStatus.RUNNING, worker=WORKER)
    opts = RunOptions(max_batch_size=4, lanes=(LANE,), length_window=4)
    claimed = claim_more(store, _record(store, first_id), opts, 1, lambda rec: True)
    assert sorted(c.prompt_tokens for c in claimed) == [9, 10, 11]
    assert all(_record(store, c.job.id).status is JobStatus.RUNNING for c in claimed)
    # all 8 were looked at (3 free rows x 4 > 8); the others are back at the head, in order
    assert _ready(r) == [ids[0], ids[2], ids[4], ids[6], ids[7]]
    _assert_no_claim(r, opts.worker_id)


def _assert_no_claim(r: redis.Redis, worker: str) -> None:
    """The claim ended: the worker's processing list holds the jobs it runs, nothing else."""
    for job_id in cast(list[str], r.lrange(keys.processing(worker), 0, -1)):
        assert r.hmget(keys.job(job_id), "status", "worker") == ["running", worker], job_id


def test_claim_with_window_one_is_arrival_order(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    first_id = store.create(_req(), LANE, prompt_tokens=10)
    ids = _enqueue(store, [90, 11, 80, 9])
    opts = RunOptions(max_batch_size=3, lanes=(LANE,), length_window=1)
    claimed = claim_more(store, _record(store, first_id), opts, 1, lambda rec: True)
    assert [c.job.id for c in claimed] == ids[:2]
    assert _ready(r) == ids[2:]


def test_one_claim_fills_from_the_lanes_in_priority_order(r: redis.Redis) -> None:
    """One pop for all lanes (a call per lane cost a round trip each, empty or not): what the
    first lane lacks comes from the next, its jobs claimed before a later lane's."""
    store = JobStore(r, ttl=100)
    urgent = f"{LANE}-urgent"
    r.delete(keys.ready(urgent))
    first_id = store.create(_req(), LANE, prompt_tokens=10)
    later = _enqueue(store, [10, 10, 10, 10])
    early = store.create(_req(), urgent, prompt_tokens=90)
    r.rpush(keys.ready(urgent), early)
    opts = RunOptions(max_batch_size=3, lanes=(urgent, LANE), length_window=1, collect_s=0)
    claimed = claim_more(store, _record(store, first_id), opts, 1, lambda rec: True)
    assert [c.job.id for c in claimed] == [early, later[0]]
    assert _ready(r) == later[1:] and not r.exists(keys.ready(urgent))


def test_claim_leaves_incompatible_and_drops_finished(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    first_id = store.create(_req(), LANE, prompt_tokens=10)
    hot = _enqueue(store, [10], temperature=0.7)
    done = _enqueue(store, [10])
    store.transition(done[0], JobStatus.CANCELLED)
    ok = _enqueue(store, [10])
    opts = RunOptions(max_batch_size=4, lanes=(LANE,), length_window=4)
    first = _record(store, first_id)
    same = first.request.temperature

    claimed = claim_more(store, first, opts, 1, lambda rec: rec.request.temperature == same)
    assert [c.job.id for c in claimed] == ok
    assert _ready(r) == hot  # the cancelled job's id is gone; its own message ends it


def test_apply_runs_many_moves_in_one_call(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    a, b = (store.create(_req(), LANE, 5) for _ in range(2))
    res = store.apply([Move(a, JobStatus.RUNNING, worker=WORKER), Move(b, JobStatus.SUCCEEDED)])
    assert res[0].ok and not res[1].ok and res[1].previous == "queued"
    assert _status(store, a) is JobStatus.RUNNING and _status(store, b) is JobStatus.QUEUED
    assert store.get("job_missing") is None
    assert store.apply([]) == []


def test_batch_finishes_every_job_and_skips_their_later_messages(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    ids = _enqueue(store, [3, 4, 5, 6])
    first = cast(str, r.lpop(keys.ready(LANE)))
    opts = RunOptions(max_batch_size=4, lanes=(LANE,), length_window=2)
    outcomes = run_call(first, store, EchoEngine("echo"), opts)
    assert [o.status for o in outcomes] == [JobStatus.SUCCEEDED] * 4
    assert {_record(store, j).job.engine_rows for j in ids} == {4}
    # each job's own message arrives later and finds it finished
    assert [o.skipped for o in run_call(ids[2], store, EchoEngine("echo"), opts)] == [True]
    _assert_no_claim(r, opts.worker_id)


def test_drain_ends_its_claims_whatever_it_finds(r: redis.Redis) -> None:
    """The drain claims the next ready id before it starts it: a job that runs alone
    (seeded) and a lane holding only a finished job's stale id end the claim too."""
    store = JobStore(r, ttl=100)
    opts = RunOptions(max_batch_size=3, lanes=(LANE,), length_window=1)
    first = store.create(_req(), LANE, prompt_tokens=3)  # the message's job
    mates = _enqueue(store, [3, 4])
    seeded = store.create(_req().model_copy(update={"seed": 7}), LANE, prompt_tokens=3)
    store.r.rpush(keys.ready(LANE), seeded)
    stale = _enqueue(store, [3])
    store.transition(stale[0], JobStatus.CANCELLED)
    outcomes = drain(first, store, EchoEngine("echo"), opts, budget_s=5)
    assert [o.status for o in outcomes] == [JobStatus.SUCCEEDED] * 4
    assert all(_status(store, j) is JobStatus.SUCCEEDED for j in [first, *mates, seeded])
    assert _ready(r) == []
    _assert_no_claim(r, opts.worker_id)


_CLAIM_AND_HANG = """
import sys, redis
from core.job_store import JobStore
from workers.claim import claim_more
from workers.options import RunOptions
r = redis.Redis.from_url(sys.argv[1], decode_responses=True)
store = JobStore(r, ttl=100)
first = store.get(sys.argv[2])
opts = RunOptions(max_batch_size=8, lanes=(sys.argv[3],), length_window=4,
                  collect_s=60, collect_max_s=60, worker_id="dead-host:1")
# nothing fits: every id looked at is held while the batch waits for more (a long while)
claim_more(store, first, opts, 1, lambda rec: False)
"""


def test_ids_a_killed_worker_had_claimed_go_back_to_the_head_of_their_lane(redis_url: str) -> None:
    """kill -9 while a worker fills a batch: the ids it took off the ready list come back,
    in order, once its heartbeat lapses. Before, they were only in the dead process's memory,
    and a queued job whose message the dead worker's parent held waited for the broker's
    visibility timeout (20 minutes): the outage test hung about one run in four."""
    url = with_db(redis_url, 10)  # apart from the test stacks' workers, whose reapers would race ours
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    store = JobStore(r, ttl=100)
    first = store.create(_req(), LANE, prompt_tokens=5)
    ids = _enqueue(store, [5, 6, 7])
    r.set(keys.worker("dead-host:1"), "{}", px=1500)  # alive, until it stops beating
    child = procs.popen([sys.executable, "-c", _CLAIM_AND_HANG, url, first, LANE], cwd=ROOT)
    try:

        def claimed_three() -> bool:
            assert child.poll() is None, f"the claiming child exited with code {child.returncode}"
            return r.llen(keys.processing("dead-host:1")) >= 3

        eventually(claimed_three, timeout=30, interval=0.02, message="three ids in its processing list")
        assert _ready(r) == []  # taken off the lane, waiting in its processing list
        assert 0 < r.ttl(keys.processing("dead-host:1")) <= 100 and 0 < r.ttl(keys.PROCESSING_WORKERS) <= 100
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
    state = lifecycle.WorkerState(Settings(redis_url=url), EchoEngine("echo"))
    assert state.reap() == 0 and _ready(r) == []  # its heartbeat stands: it may be alive
    eventually(lambda: not r.exists(keys.worker("dead-host:1")), timeout=30, message="its heartbeat lapsed")
    state.reap()
    assert _ready(r) == ids  # back at the head, in their order
    assert not r.exists(keys.processing("dead-host:1"))
    assert "dead-host:1" not in cast(set[str], r.smembers(keys.PROCESSING_WORKERS))
    assert [
        o.status
        for o in run_call(ids[0], store, EchoEngine("echo"), RunOptions(max_batch_size=4, lanes=(LANE,)))
    ] == [JobStatus.SUCCEEDED] * 3


def test_collect_waits_once_for_a_lone_job_and_longer_for_a_burst(r: redis.Redis) -> None:
    store = JobStore(r, ttl=100)
    opts = RunOptions(max_batch_size=6, lanes=(LANE,), collect_s=0.05, collect_max_s=3.0)
    lone = _record(store, store.create(_req(), LANE, prompt_tokens=5))
    t0 = time.monotonic()
    assert claim_more(store, lone, opts, 1, lambda rec: True) == []
    assert time.monotonic() - t0 < 1.0  # one collect window, not collect_max_s

    first = _record(store, store.create(_req(), LANE, prompt_tokens=5))

    def burst() -> None:  # a client still submitting: one job every 20 ms
        for _ in range(5):
            time.sleep(0.02)  # time passing is the point: jobs arriving while the batch collects
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
    opts = RunOptions(max_batch_size=3, lanes=(LANE,), collect_s=0.05, collect_max_s=3.0)
    first = _record(store, store.create(_req(), LANE, prompt_tokens=5))
    hot = _enqueue(store, [5, 5], temperature=0.7)

    def late() -> None:
        for _ in range(2):
            time.sleep(0.02)  # time passing is the point: jobs arriving while the batch collects
            _enqueue(store, [5])

    feeder = threading.Thread(target=late)
    feeder.start()
    claimed = claim_more(store, first, opts, 1, lambda rec: rec.request.temperature == 0.0)
    feeder.join()
    assert len(claimed) == 2
    assert _ready(r) == hot
