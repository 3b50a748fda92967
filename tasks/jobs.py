"""Thin Celery tasks: take the job id, hand it to the runner, nothing else."""

from __future__ import annotations

from core.config import get_settings
from tasks.app import app
from workers import lifecycle, runner

RUN_JOB = "inferq.run_job"


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str | None:
    st = lifecycle.state()
    settings = get_settings()
    # Batch lines skip token streaming: nobody watches them, and the non-streaming path is faster.
    stream = run_job.request.delivery_info.get("routing_key") != settings.queue_batch
    st.current = [job_id]
    try:
        outcome = runner.run_job(job_id, st.store, st.engine, settings.default_max_tokens, stream=stream)
    finally:
        st.current = []
    st.jobs_done += 1
    return outcome.status.value if outcome.status else None
