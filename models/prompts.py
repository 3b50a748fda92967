"""Counting prompt tokens exactly as the engine will, without loading the weights.

Why in the API too: a prompt longer than the context is a 400 at submission, not a failed
job later; the count uses the model's own template (tools rendered), so it matches the
engine's token for token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from core.config import Settings
from models.spec import ModelFacts, ModelSpec, resolve_model


class PromptCounter(Protocol):
    """Counts prompt tokens exactly as the engine will (template included)."""

    facts: ModelFacts

    def count_prompt_tokens(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int: ...

    def count_text_tokens(self, text: str) -> int:
        """Tokens of a piece of generated text (no template)."""
        ...


@contextmanager
def root_log_levels_kept() -> Iterator[None]:
    """ms-swift, on import, sets every plain StreamHandler of the root logger to ERROR (to
    quiet PyTorch DDP ranks). In a worker child that is Celery's handler: every INFO and
    WARNING line of the child, Celery's and ours (the reaper, the watchdog, the demo-model
    warning), was dropped. The levels are put back once ms-swift is loaded."""
    levels = [(h, h.level) for h in logging.getLogger().handlers]
    try:
        yield
    finally:
        for handler, level in levels:
            handler.setLevel(level)


class WordCounter:
    """The echo engine's counts (a word is a token): what the API counts with when the
    workers run the echo engine (plumbing tests, the queue-floor bench)."""

    def __init__(self, model_id: str, context_length: int = 4096) -> None:
        self.facts = ModelFacts(model_id=model_id, context_length=context_length, demo=True)

    def count_prompt_tokens(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int:
        return sum(len(str(m["content"]).split()) + 2 for m in messages) + 8 * len(tools or [])

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())


def tool_format(template: Any) -> str | None:
    """ "hermes" when the template renders tools and calls in the format we parse (Qwen2.5,
    Qwen3, ...), else None: tools are refused for the model with a 400."""
    from swift.agent_template.hermes import HermesAgentTemplate

    return "hermes" if isinstance(getattr(template, "agent_template", None), HermesAgentTemplate) else None


class SwiftPromptCounter:
    """The template without the model: exact prompt counts for validation in the API."""

    def __init__(self, spec: ModelSpec, settings: Settings, model_id: str = "") -> None:
        from swift.infer_engine import InferRequest
        from swift.model import get_processor
        from swift.template import get_template

        self._request = InferRequest
        processor = get_processor(str(spec.path), model_type=spec.model_type or None)
        self.template = get_template(processor, template_type=spec.template or None)
        self.facts = ModelFacts(
            model_id=model_id or settings.model_id,
            context_length=int(self.template.max_length or 0),
            demo=spec.demo,
            tool_format=tool_format(self.template),
            vocab_size=len(self.template.tokenizer),
        )

    def count_prompt_tokens(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int:
        return len(self.template.encode(self._request(messages=messages, tools=tools))["input_ids"])

    def count_text_tokens(self, text: str) -> int:
        return len(self.template.tokenizer.encode(text, add_special_tokens=False))


def load_prompt_counter(settings: Settings) -> PromptCounter:
    if settings.engine == "echo":
        return WordCounter(settings.model_id)
    with root_log_levels_kept():
        return SwiftPromptCounter(resolve_model(settings), settings)


def counter_for(model_id: str, announced: Mapping[str, Any], settings: Settings) -> PromptCounter:
    """The counter of a model a worker announced (tasks.child.announcement): its template
    read from the path the worker loaded it from, which the API's host must see too."""
    if announced.get("engine") == "echo":
        return WordCounter(model_id, int(announced.get("context_length") or 4096))
    spec = ModelSpec(
        path=Path(str(announced.get("path") or "")),
        model_type=str(announced.get("model_type") or ""),
        template=str(announced.get("template") or ""),
        demo=bool(announced.get("demo")),
    )
    with root_log_levels_kept():
        return SwiftPromptCounter(spec, settings, model_id)
