"""The worker parent's gate (tasks.parent_gate.ParentGate) on a real Valkey/Redis, with a stand-in
for Celery's default handler: finished jobs' messages are acknowledged without reaching
the pool, unfinished ones wait while the child is busy and go to it one at a time, in
order, when it is idle."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from core import keys
from core.job_store import JobStore
from schemas.jobs import JobStatus
from schemas.openai import ChatCompletionRequest
from tasks.parent_gate import CHECK_S, READ_EVERY, ParentGate

LANE = "inferq.test-skip"


WORKER = "test-skip:1"


@pytest.fixture(autouse=True)
def _alive(r: redis.Redis) -> Iterator[None]:
    """The jobs these tests mark running are WORKER's: it beats while a test runs, or a
    worker's reaper sharing this server would send them again."""
    r.set(keys.worker(WORKER), "{}", ex=60)
    yield
    r.delete(keys.worker(WORKER), keys.processing(WORKER))
    r.srem(keys.PROCESSING_WORKERS, WORKER)


@dataclass
class Message:
    headers: dict[str, Any]
    delivery_info: dict[str, Any] = field(default_factory=lambda: {"routing_key": LANE})


@dataclass
class Pool:
    """What the default handler would hand to the pool child, and the child's state."""

    busy: bool = False
    handed: list[str] = field(default_factory=list)
    acked: list[tuple[str, JobStatus]] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    wakes: int = 0
    delays: list[float] = field(default_factory=list)
    in_broker: int = 0  # messages waiting in the lane's broker queue

    def handler(self, message: Message, *_: Any, **__: Any) -> None:
        self.handed.append(message.headers.get("id", "?"))
        self.busy = True  # the child took it

    def finished(self, job_id: str, facts: dict[str, str], ack: Any) -> None:
        self.acked.append((job_id, JobStatus(facts["status"])))

    def wake(self, delay: float = 0.0) -> None:
        self.wakes += 1
        self.delays.append(delay)

    def requeue(self, reject: Any) -> None:
        self.requeued.append(reject)  # the tests pass the job id as the message's `reject`


def _gate(store: JobStore, pool: Pool, hold_queued_s: float = 60.0) -> ParentGate:
    return ParentGate(
        store,
        pool.handler,
        pool.finished,
        pool.requeue,
        busy=lambda: pool.busy,
        wake=pool.wake,
        hold_queued_s=hold_queued_s,
        waiting=lambda queue: pool.in_broker if queue == LANE else -1,
    )


def _jobs(store: JobStore, n: int) -> list[str]:
    req = ChatCompletionRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    )
    return [store.create(req, LANE, prompt_tokens=1) for _ in range(n)]


def _send(gate: ParentGate, job_id: str) -> None:
    gate.on_message(Message({"id": job_id}), {}, None, job_id, None)


def test_finished_jobs_are_acked_in_the_parent(r: redis.Redis) -> None:
    store, pool = JobStore(r, 60), Pool()
    gate = _gate(store, pool)
    done, cancelled = _jobs(store, 2)
    store.transition(done, JobStatus.RUNNING, worker=WORKER)
    store.transition(done, JobStatus.FAILED)
    store.transition(cancelled, JobStatus.CANCELLED)
    _send(gate, done)
    pool.busy = False
    _send(gate, cancelled)
    assert pool.acked == [(done, JobStatus.FAILED), (cancelled, JobStatus.CANCELLED)]
    assert pool.handed == [] and not gate.held


def test_busy_child_holds_unfinished_jobs_until_they_finish_or_it_is_idle(r: redis.Redis) -> None:
    store, pool = JobStore(r, 60), Pool(busy=True)
    gate = _gate(store, pool)
    running, queued_a, queued_b = _jobs(store, 3)
    store.transition(running, JobStatus.RUNNING, worker=WORKER)  # a batch-mate of the child's batch
    for j in (running, queued_a, queued_b):
        _send(gate, j)
    assert pool.handed == [] and [h.job_id for h in gate.held] == [running, queued_a, queued_b]
    gate.tick()  # nothing finished, child still busy
    assert pool.handed == [] and len(gate.held) == 3
    store.transition(running, JobStatus.SUCCEEDED)
    gate.tick()
    assert pool.acked == [(running, JobStatus.SUCCEEDED)] and pool.handed == []
    pool.busy = False  # the child's task ended: it gets the oldest held message, only that one
    gate.tick()
    assert pool.handed == [queued_a] and [h.job_id for h in gate.held] == [queued_b]
    assert pool.wakes >= 4 and pool.requeued == []  # a tick is asked for while anything is held


def test_queued_messages_held_too_long_go_back_to_an_empty_broker_queue(r: redis.Redis) -> None:
    """So that an idle worker can take them while this one stays busy with a long batch; not
    while the queue has messages of its own (idle workers wake up with those)."""
    store, pool = JobStore(r, 60), Pool(busy=True, in_broker=5)
    gate = _gate(store, pool, hold_queued_s=0.05)
    running, queued = _jobs(store, 2)
    store.transition(running, JobStatus.RUNNING, worker=WORKER)
    _send(gate, running)
    _send(gate, queued)
    time.sleep(0.1)  # time passing is the point: past hold_queued_s
    gate.tick()
    assert pool.requeued == [] and len(gate.held) == 2  # the broker still has work to hand out
    pool.in_broker = 0
    gate.tick()  # its clock restarted at the last check
    assert pool.requeued == []
    time.sleep(0.1)  # time passing is the point: past hold_queued_s again
    gate.tick()
    assert pool.requeued == [queued] and [h.job_id for h in gate.held] == [running]
    assert pool.handed == []


def test_no_tick_is_asked_for_when_nothing_is_held_and_a_closed_gate_hands_nothing(r: redis.Redis) -> None:
    store, pool = JobStore(r, 60), Pool()
    gate = _gate(store, pool)
    first, second = _jobs(store, 2)
    _send(gate, first)  # idle child: handed at once
    assert pool.wakes == 0
    _send(gate, second)
    assert pool.wakes == 1 and len(gate.held) == 1
    gate.close()  # the consumer restarted: held messages go back to the broker
    pool.busy = False
    gate.tick()
    assert pool.handed == [first] and pool.requeued == [second] and not gate.held


def test_idle_child_gets_messages_at_once_but_never_ahead_of_held_ones(r: redis.Redis) -> None:
    store, pool = JobStore(r, 60), Pool()
    gate = _gate(store, pool)
    first, second, third = _jobs(store, 3)
    _send(gate, first)
    assert pool.handed == [first]  # idle: straight to the child
    _send(gate, second)  # busy now: held
    pool.busy = False
    _send(gate, third)  # idle again, but `second` came first
    assert pool.handed == [first, second] and [h.job_id for h in gate.held] == [third]


def test_what_the_parent_cannot_judge_goes_to_the_child(r: redis.Redis) -> None:
    pool = Pool(busy=True)
    gate = _gate(JobStore(r, 60), pool)
    _send(gate, "job_missing")  # held while the child is busy, read with the others
    gate.on_message(Message({}), {}, None, None, None)  # not one of ours: to the pool at once
    assert pool.handed == ["?"] and [h.job_id for h in gate.held] == ["job_missing"]
    pool.busy = False
    gate.tick()  # no record: to the child, which logs and drops it
    pool.busy = False
    dead = JobStore(redis.Redis(unix_socket_path="/nonexistent/inferq.sock", decode_responses=True), 60)
    unreachable = ParentGate(dead, pool.handler, pool.finished, pool.requeue, busy=lambda: pool.busy)
    unreachable.on_message(Message({"id": "job_x"}), {}, None, None, None)
    assert pool.handed == ["?", "job_missing", "job_x"] and not gate.held and not unreachable.held


def test_a_busy_child_costs_one_slow_check_and_its_end_moves_held_messages_at_once(r: redis.Redis) -> None:
    """While the child works, held messages are re-read every CHECK_S (not every few ms:
    that cost grew with the batch's length); when Celery reports the child done, the gate
    asks for a tick at once and the next held message goes to the child."""
    store, pool = JobStore(r, 60), Pool(busy=True)
    gate = _gate(store, pool)
    first, second = _jobs(store, 2)
    _send(gate, first)
    _send(gate, second)
    assert pool.delays and set(pool.delays) == {CHECK_S} and CHECK_S >= 0.5
    pool.busy = False
    gate.child_done()
    assert pool.delays[-1] == 0.0
    gate.tick()
    assert pool.handed == [first]


def test_a_busy_childs_messages_are_read_together(r: redis.Redis) -> None:
    """While the child works, arriving messages are held unread and their jobs read in one
    round trip per READ_EVERY (one read each cost the broker a round trip per job); finished
    ones are acknowledged then, the others stay held."""
    reads: list[int] = []

    class Counting(JobStore):
        def fields_of(self, job_ids: list[str], names: Sequence[str]) -> list[dict[str, str]]:
            reads.append(len(job_ids))
            return super().fields_of(job_ids, names)

    store, pool = Counting(r, 60), Pool(busy=True)
    gate = _gate(store, pool)
    jobs = _jobs(store, 2 * READ_EVERY)
    for job_id in jobs[:-1]:
        store.transition(job_id, JobStatus.CANCELLED)
    for job_id in jobs:
        _send(gate, job_id)
    assert reads == [READ_EVERY, READ_EVERY]
    assert [j for j, _ in pool.acked] == jobs[:-1]
    assert [h.job_id for h in gate.held] == jobs[-1:] and pool.handed == []
