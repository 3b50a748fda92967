"""A worker parent stops when its child cannot load the engine.

Why: Celery's parent forks a new child whenever one exits, so a model that cannot load
(corrupt weights, a GPU out of memory) was loaded again and again, each attempt failing,
while the worker looked alive to systemd, Docker or `inferq run`. The child tells its
parent (SIGUSR2: Celery leaves it alone unless CELERY_RDBSIG is set), and the parent stops
as on SIGTERM, with exit code ENGINE_FAILED, for whatever started it to report it and
start it again with a backoff of its own.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

from workers import shutdown_log

ENGINE_FAILED = 3
SIGNAL = signal.SIGUSR2


def on_worker_init(**_: Any) -> None:
    """`worker_init`, in the parent, before the pool starts."""
    signal.signal(SIGNAL, _stop)


def _stop(_signum: int, _frame: FrameType | None) -> None:
    from celery.worker import state

    shutdown_log.FILTER.shutting_down = True  # a child forked meanwhile ends without a word
    state.should_stop = ENGINE_FAILED  # the consumer loop raises WorkerShutdown(ENGINE_FAILED)


def tell_parent() -> None:
    """In the pool child whose engine failed to load."""
    os.kill(os.getppid(), SIGNAL)
