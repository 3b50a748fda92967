"""The engine seam: what the queue code needs from a model, and nothing more.

Why a seam of our own: the task and runner code must not import torch or ms-swift
(the Celery parent imports them and must stay CUDA-free), and plumbing tests need a
fake engine that behaves the same from the outside.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from models.spec import ModelFacts

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenParams:
    """One request's generation settings. Requests with any settings share a `generate`
    call: each row is limited, stopped and sampled with its own (workers.engines.rows)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    #: None: the model's default (its generation_config); 0: no top-k cut
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: vLLM's extensions (see schemas.openai)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    #: (token id, bias) pairs added to the logits
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: the llguidance grammar the output must follow (schemas.grammar); None: free text
    grammar: str | None = None
    #: None: no logprobs; else the alternatives per token (0-20)
    logprobs: int | None = None

    @property
    def picks(self) -> bool:
        """The row needs the per-row picker (anything beyond greedy, limits and stops)."""
        return bool(
            self.temperature > 0
            or self.grammar is not None
            or self.logprobs is not None
            or self.logit_bias
            or self.repetition_penalty != 1.0
            or self.min_tokens
            or self.ignore_eos
        )


@dataclass(frozen=True)
class GenRequest:
    #: OpenAI-shaped messages as ms-swift's template takes them (tool calls included)
    messages: list[dict[str, Any]]
    params: GenParams
    #: the LoRA adapter (served name) this row runs through; "": the base model
    adapter: str = ""
    #: OpenAI tool definitions, rendered into the prompt by the template's agent template
    tools: list[dict[str, Any]] | None = None


class AdapterMissing(LookupError):
    """The row names an adapter this worker does not serve (removed, or refused)."""


@dataclass(frozen=True)
class GenResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    #: OpenAI's `logprobs.content` entries, one per generated token, when asked for
    logprobs: list[dict[str, Any]] | None = None


class TokenSink(Protocol):
    """Where a streaming `generate` reports; request i is `requests[i]`."""

    def on_delta(self, i: int, text: str) -> None: ...

    def on_reset(self, i: int) -> None: ...

    def flush(self) -> None: ...

    def should_stop(self, i: int) -> bool:
        """True once request i was cancelled: generation for it stops within a step."""
        ...

    def any_stop(self) -> bool:
        """False when no request may stop now (the per-step fast path); True means: ask
        `should_stop` row by row."""
        ...

    def wants_tokens(self, i: int) -> bool:
        """False when nobody watches request i's deltas (a batch line): an engine may then
        skip detokenizing step by step."""
        ...


class Engine(Protocol):
    facts: ModelFacts

    def generate(
        self, requests: Sequence[GenRequest], sink: TokenSink | None = None
    ) -> list[GenResult | Exception]:
        """One result per request, in order. A per-request failure is returned, not raised,
        so one bad request cannot sink the others. With a sink, text deltas stream to it
        as they are generated (real engine streaming) and their concatenation equals the
        result's text."""
        ...

    def count_prompt_tokens(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int: ...

    def progress(self) -> float | None:
        """`time.monotonic()` of the last generation step while a `generate` runs, None when
        idle: the worker's watchdog reads it to tell a long generation from a hung one."""
        ...

    def generated_tokens(self) -> int:
        """Tokens generated since the engine loaded, counted as each step makes them (not
        when a job ends): the heartbeat's tokens/s is then real while one long job runs."""
        ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the first stop sequence, as OpenAI does (the engine keeps it)."""
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    if cut < 0:
        return text, False
    return text[:cut], True


def run_split(
    run: Callable[[list[int]], list[GenResult | Exception]],
    idxs: list[int],
    on_retry: Callable[[int], None] | None = None,
) -> list[GenResult | Exception]:
    """Run a call; if it fails as a whole, split it in halves and retry each, down to single
    requests. An out-of-memory call thus succeeds in smaller pieces, and a poisoned request
    ends up failing alone, before any good request is failed."""
    try:
        return run(idxs)
    except Exception as exc:
        if len(idxs) == 1:
            return [exc]
        logger.warning("call of %d rows failed (%s); retrying in halves", len(idxs), exc)
        for i in idxs:
            if on_retry is not None:
                on_retry(i)
        half = len(idxs) // 2
        return run_split(run, idxs[:half], on_retry) + run_split(run, idxs[half:], on_retry)


class ContinuousEngine(Engine, Protocol):
    """What the continuous drain needs beyond `Engine` (workers.engines.continuous)."""

    def open(self, sink: TokenSink | None) -> None: ...

    def add(self, row: int, request: GenRequest) -> None: ...

    def poll(self, timeout_s: float) -> list[tuple[int, GenResult | Exception]]: ...

    def close(self) -> None: ...

    def active_rows(self) -> int: ...

    def take_step_counts(self) -> tuple[int, int]: ...
