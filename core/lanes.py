"""Lanes per model: each base model has its own three lanes (interactive, jobs, batch).

Why per model: a worker serves one base model (and its LoRA adapters); were the lanes shared,
a worker would take a job for a model it cannot run. A lane's name is the queue setting's
name and the model's, `inferq.jobs@tiny`: one Celery queue and one ready list
(`keys.ready`) per pair, so the workers of a model consume only their own lanes and the
priority between a model's lanes holds as before. The model comes last and may hold any
character ('@' and '/' included): it is what follows the first '@'.
"""

from __future__ import annotations

SEPARATOR = "@"


def lane(queue: str, model: str) -> str:
    """The lane of `model` for the queue setting `queue` (e.g. `inferq.jobs`)."""
    return f"{queue}{SEPARATOR}{model}"


def parts(name: str) -> tuple[str, str]:
    """(queue, model) of a lane; ("name", "") for a name without a model."""
    queue, _, model = name.partition(SEPARATOR)
    return queue, model
