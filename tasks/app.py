"""The Celery app. Importing it must stay cheap and torch-free: the worker parent,
the API and Flower all import it."""

import warnings

from celery import Celery
from celery.exceptions import SecurityWarning
from celery.signals import (
    after_setup_logger,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutting_down,
)

from workers import engine_failure, lifecycle, shutdown_log

# Celery warns on every start as root (containers often run as root); its danger is
# unpickling messages as root, and this app accepts JSON only (celeryconfig).
warnings.filterwarnings("ignore", category=SecurityWarning)

app = Celery("inferq")
app.config_from_object("celeryconfig")
app.autodiscover_tasks(["tasks"], related_name="jobs", force=True)

worker_init.connect(engine_failure.on_worker_init, weak=False)
worker_process_init.connect(lifecycle.init_child, weak=False)
worker_process_shutdown.connect(lifecycle.shutdown_child, weak=False)
after_setup_logger.connect(shutdown_log.on_setup_logger, weak=False)
worker_shutting_down.connect(shutdown_log.on_shutting_down, weak=False)
