"""The answer to a request for a LoRA adapter the workers refused (api.fleet reads which).

Why its own answer: a worker found the adapter in INFERQ_ADAPTERS_DIR and refused it (broken
files, another base model); a client told "does not exist" would look for a typo."""

from __future__ import annotations

from api.errors import APIError


def refused_error(name: str, reason: str) -> APIError:
    """A request for an adapter the workers refused: 404 (no retry makes it servable; its
    files must change), with a code of its own and the reason, unlike a `model` nobody has."""
    return APIError(
        404,
        f"The adapter '{name}' was found but refused: {reason}",
        param="model",
        code="adapter_refused",
    )
