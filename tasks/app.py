"""The Celery app. Importing it must stay cheap and torch-free: the worker parent,
the API and Flower all import it."""

import warnings

from celery import Celery
from celery.exceptions import SecurityWarning
from celery.signals import (
    after_setup_logger,
    worker_init,
    worker_shutting_down,
)
from kombu import Exchange, Queue

from tasks import engine_failure, events, shutdown_log

# Celery warns on every start as root (containers often run as root); its danger is
# unpickling messages as root, and this app accepts JSON only (celeryconfig).
warnings.filterwarnings("ignore", category=SecurityWarning)

#: the one task: its id is the job id, its only argument too
RUN_JOB = "inferq.run_job"

# `include`: the worker imports the task module (and with it the engine's lifecycle) at
# start; the API and Flower import this module only, which stays free of `workers`.
app = Celery("inferq", include=["tasks.run_job"])
app.config_from_object("celeryconfig")

worker_init.connect(engine_failure.on_worker_init, weak=False)
worker_init.connect(shutdown_log.on_worker_init, weak=False)
after_setup_logger.connect(shutdown_log.on_setup_logger, weak=False)
worker_shutting_down.connect(shutdown_log.on_shutting_down, weak=False)


def send_job(job_id: str, lane: str, model: str) -> None:
    """Enqueue a job's message again (the worker's recovery; the API writes its own messages
    in the same round trip as the job record, api.publish). The lane may be another model's
    (a reaper sends any dead worker's jobs), which this process never declared: it is named
    whole, exchange and routing key, as celeryconfig declares every lane."""
    kwargs = events.kwargs_repr(model, lane)
    queue = Queue(lane, Exchange(lane, type="direct"), routing_key=lane)
    app.send_task(RUN_JOB, args=[job_id], task_id=job_id, queue=queue, kwargsrepr=kwargs)
