"""The worker parent's log while it stops with a job in flight.

Why: `inferq run`'s Ctrl-C (or any SIGTERM to the worker's process group) ends the pool
child mid-generation. Nothing is lost: the child puts its jobs back on the way out
(`WorkerState.settle` sends them again) and the late-acked message is requeued. But
Celery's parent reports the child's exit as an error with a WorkerLostError traceback,
which reads like a crash to whoever pressed Ctrl-C. Only while the parent is shutting down,
those two records are replaced by one line that says what happens to the job; a child
that had no job (Ctrl-C while it loaded its model) goes without a word.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

#: the request's WorkerLostError means a job was in flight; billiard's "exited with" comes
#: for every child that a stop signal ends, one loading its model included
_JOB_LOST = "WorkerLostError"
_CHILD_EXITED = "exited with"


class ShutdownLossFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.shutting_down = False
        self._said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.shutting_down or record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        if _JOB_LOST not in text:
            return _CHILD_EXITED not in text
        if not self._said:
            self._said = True
            logging.getLogger("inferq.worker").warning(
                "stopped with a job in flight: it runs again when a worker is back"
            )
        return False


FILTER = ShutdownLossFilter()


#: where the two records are made (billiard logs as "multiprocessing"); a logger's filters
#: see only the records made on it, not those its children pass up
_SOURCES = ("celery.worker.request", "multiprocessing")


def on_setup_logger(**_: Any) -> None:
    """`after_setup_logger`."""
    for name in _SOURCES:
        logging.getLogger(name).addFilter(FILTER)


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """`worker_init`, in the parent before it installs its signal handlers. Under Celery's
    `--quiet` (`inferq run` without --verbose), its SIGTERM handler without the
    "worker: Warm shutdown (MainProcess)" it otherwise writes straight to stdout, whatever
    the log level: a stop that the supervisor asked for is no news. (SIGINT, which only a
    terminal of the worker's own sends, keeps its lines.)"""
    if not getattr(sender, "quiet", False):
        return
    from celery.apps import worker as celery_worker

    # read when `install_platform_tweaks` runs (on start, after this signal)
    term = celery_worker.install_worker_term_handler
    celery_worker.install_worker_term_handler = functools.partial(term, verbose=False)


def on_shutting_down(**_: Any) -> None:
    """`worker_shutting_down`, sent in the parent by its SIGTERM/SIGINT handler."""
    FILTER.shutting_down = True
