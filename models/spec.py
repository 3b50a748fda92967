"""Which model a process serves, and what the API needs to know about it.

Why a package of its own, below `workers`: the API counts prompt tokens with the served
model's template and reads its facts, and the worker loads the same model; neither may
import the other, so what both need lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.config import Settings
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE, is_demo_model


@dataclass(frozen=True)
class ModelFacts:
    """What the API and /v1/models need to know about the served model."""

    model_id: str
    context_length: int
    demo: bool
    #: runs on a GPU (the warm-up sweeps row counts there)
    accelerator: bool = False
    #: the template's tool-call format ("hermes"), or None: it renders no tools
    tool_format: str | None = None
    #: the tokenizer's vocabulary (logit_bias keys are checked against it); 0: unknown
    vocab_size: int = 0


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    model_type: str
    template: str
    adapters: list[str] = field(default_factory=list)
    demo: bool = False


def resolve_model(settings: Settings) -> ModelSpec:
    """The model to serve: the one named in settings, else the demo model."""
    if settings.model_path:
        path = Path(settings.model_path)
        return ModelSpec(
            path=path,
            model_type=settings.model_type,
            template=settings.template,
            adapters=list(settings.adapters),
            demo=is_demo_model(path),
        )
    return ModelSpec(
        path=settings.demo_model_dir, model_type=DEMO_MODEL_TYPE, template=DEMO_TEMPLATE, demo=True
    )
