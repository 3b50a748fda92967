"""A worker parent stops when its child cannot load the engine.

Why: Celery's parent forks a new child whenever one exits, so a model that cannot load
(corrupt weights, a GPU out of memory) was loaded again and again, each attempt failing,
while the worker looked alive to systemd, Docker or `inferq run`. The child tells its
parent (SIGUSR2: Celery leaves it alone unless CELERY_RDBSIG is set), and the parent stops
as on SIGTERM, with exit code ENGINE_FAILED, for whatever started it to report it and
start it again with a backoff of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType
from typing import Any

from tasks import shutdown_log

ENGINE_FAILED = 3
SIGNAL = signal.SIGUSR2


#: the Celery parent's pid, set in it before the pool forks (so its children know it too)
_PARENT: int | None = None


def on_worker_init(**_: Any) -> None:
    """`worker_init`, in the parent, before the pool starts."""
    global _PARENT
    _PARENT = os.getpid()
    signal.signal(SIGNAL, _stop)


def _stop(_signum: int, _frame: FrameType | None) -> None:
    from celery.worker import state

    shutdown_log.FILTER.shutting_down = True  # a child forked meanwhile ends without a word
    state.should_stop = ENGINE_FAILED  # the consumer loop raises WorkerShutdown(ENGINE_FAILED)


def tell_parent() -> None:
    """In the pool child whose engine failed to load. Only to the parent that set the
    handler: under `--pool solo` there is none (the shell would get the signal), and an
    orphaned child's parent is init."""
    if _PARENT is not None and os.getppid() == _PARENT:
        with contextlib.suppress(OSError):
            os.kill(_PARENT, SIGNAL)
