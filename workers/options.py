"""How a worker runs its jobs: the settings a drain needs, gathered once per task.

Why a module of its own: the runner and the claim code both read them, and neither may
import the other.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from models.hooks import Hooks


def process_worker_id() -> str:
    """This process's id in Redis (its heartbeat, its processing list): host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class RunOptions:
    default_max_tokens: int = 512
    #: rows (requests, counting `n`) one `generate` call may take
    max_batch_size: int = 1
    #: lanes to pull more jobs from, in priority order (their `ready` lists)
    lanes: tuple[str, ...] = ()
    #: how long to wait for more jobs when the call is not full (a shallow queue) ...
    collect_s: float = 0.0
    #: ... and at most, while jobs keep arriving (workers.claim)
    collect_max_s: float = 0.0
    #: ready jobs looked at per free row, to pick those closest in prompt length (workers.claim)
    length_window: int = 1
    #: False: no job of the call publishes token events
    publish_tokens: bool = True
    #: filled with the ids of the jobs being run, for the caller's watchdog
    running: list[str] | None = None
    #: a job whose worker died this many times is failed instead of run again
    max_attempts: int = 3
    #: generation time limit when the record has none
    timeout_s: float = 600.0
    #: this worker's id: its heartbeat and its processing list (the ids it took)
    worker_id: str = field(default_factory=process_worker_id)
    #: the base model's id: a job for any other `model` runs through that LoRA adapter
    base_model: str = ""
    #: this process's hooks (models.hooks); their `after` runs on each finished result
    hooks: Hooks = field(default_factory=Hooks)


def interactive_reserve(max_batch_size: int) -> int:
    """Rows the loop runs beyond MAX_BATCH_SIZE, for interactive requests only."""
    return max(1, max_batch_size // 8)
