"""Thin Celery tasks: take the job id, hand it to the runner, nothing else."""

from __future__ import annotations

import contextlib
from typing import cast

import redis
from celery import Task
from celery.exceptions import Ignore

from core.config import get_settings
from tasks import events
from tasks.app import app
from workers import lifecycle, runner
from workers.continuous_runner import ContinuousEngine, drain_continuous

RUN_JOB = "inferq.run_job"


# Strategy: messages of jobs already run by a batch-mate are acknowledged in the parent (tasks.skip)
@app.task(
    bind=True,
    name=RUN_JOB,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    Strategy="tasks.skip:skip_finished",
    Request="tasks.skip:GateRequest",
)
def run_job(self: Task, job_id: str) -> None:
    st = lifecycle.state()
    s = get_settings()
    opts = runner.RunOptions(
        default_max_tokens=s.default_max_tokens,
        max_batch_size=s.max_batch_size,
        lanes=tuple(s.queues),
        collect_s=s.batch_collect_ms / 1000,
        collect_max_s=max(s.batch_collect_max_ms, s.batch_collect_ms) / 1000,
        length_window=s.batch_length_window,
        running=st.current,
        max_attempts=s.max_attempts,
        timeout_s=s.job_timeout_s,
        worker_id=st.worker_id,
        base_model=s.model_id,
    )
    with st.task_lock, st.busy():
        try:
            if s.engine_mode == "continuous" and s.engine == "swift":
                engine = cast(ContinuousEngine, st.engine)
                outcomes = drain_continuous(job_id, st.store, engine, opts, s.continuous_drain_s)
            else:
                outcomes = runner.drain(job_id, st.store, st.engine, opts, s.drain_s)
        finally:
            st.current.clear()
            with contextlib.suppress(redis.RedisError):  # else the heartbeat does it, later
                st.settle()
    st.jobs_done += sum(1 for o in outcomes if not o.skipped)
    st.tokens_generated += sum(o.completion_tokens for o in outcomes)
    # Flower: this job's own run time and end (a drain's length, a cancel as a success, would
    # mislead), sent here; Ignore then acknowledges the message without Celery's own event
    with contextlib.suppress(redis.RedisError):
        kind, fields = events.final_event(job_id, events.job_facts(st.redis, job_id))
        self.send_event(kind, **{k: v for k, v in fields.items() if k != "uuid"})
    raise Ignore()


def _resend(job_id: str, queue: str) -> None:
    facts = events.job_facts(lifecycle.state().redis, job_id)
    kwargs = events.kwargs_repr(facts.get("model", ""), queue)
    app.send_task(RUN_JOB, args=[job_id], task_id=job_id, queue=queue, kwargsrepr=kwargs)


lifecycle.set_resender(_resend)
