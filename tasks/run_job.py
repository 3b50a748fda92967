"""The one Celery task, `inferq.run_job(job_id)`: it runs the worker's drain (static or
continuous) from that job, under the task lock the heartbeat's settling waits on (a drain
that fails settles this worker's processing list at once), counts what ran for the
heartbeat, and sends Flower the job's own final event. It also connects the pool child's start and stop
(tasks.child) to Celery's signals."""

from __future__ import annotations

import contextlib
from typing import cast

import redis
from celery import Task
from celery.exceptions import Ignore
from celery.signals import worker_process_init, worker_process_shutdown

from core.config import get_settings
from models.hooks import hooks_for
from tasks import child as lifecycle
from tasks import events
from tasks.app import RUN_JOB, app
from workers import options, runner
from workers.continuous_drain import drain_continuous
from workers.engine import ContinuousEngine


# Strategy: messages of jobs already run by a call-mate are acknowledged in the parent (tasks.parent_gate)
@app.task(  # type: ignore[untyped-decorator]  # Celery ships no types: app.task is Any
    bind=True,
    name=RUN_JOB,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    Strategy="tasks.parent_gate:skip_finished",
    Request="tasks.parent_gate:GateRequest",
)
def run_job(self: Task, job_id: str) -> None:
    st = lifecycle.state()
    s = get_settings()
    opts = options.RunOptions(
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
        hooks=hooks_for(s.hooks),
    )
    with st.task_lock, st.busy():
        try:
            if s.engine_mode == "continuous" and s.engine == "swift":
                engine = cast(ContinuousEngine, st.engine)
                outcomes = drain_continuous(job_id, st.store, engine, opts, s.continuous_drain_s)
            else:
                outcomes = runner.drain(job_id, st.store, st.engine, opts, s.drain_s)
        except BaseException:
            # jobs may be left running on this worker: put back or sent again now (a drain
            # that returns has ended every job it took; the reap loop settles once idle)
            with contextlib.suppress(redis.RedisError):  # else the reap loop does it, later
                st.settle()
            raise
        finally:
            st.current.clear()
    st.jobs_done += sum(1 for o in outcomes if not o.skipped)
    # Flower: this job's own run time and end (a drain's length, a cancel as a success, would
    # mislead), sent here; Ignore then acknowledges the message without Celery's own event
    with contextlib.suppress(redis.RedisError):
        kind, fields = events.final_event(job_id, events.job_facts(st.redis, job_id))
        self.send_event(kind, **{k: v for k, v in fields.items() if k != "uuid"})
    raise Ignore()


# the child's engine and threads: loaded after the fork, in each pool child (tasks.child)
worker_process_init.connect(lifecycle.init_child, weak=False)
worker_process_shutdown.connect(lifecycle.shutdown_child, weak=False)
