"""The real engine: ms-swift's TransformersEngine behind our `Engine` seam.

Only the worker child (and the API's prompt counter) import this module, never the
Celery parent: importing torch before fork breaks CUDA in the children.

What we add around ms-swift 4.6, and why:
- `seed`, `presence_penalty` and `frequency_penalty` are silently ignored by the engine;
  we honour them ourselves (torch seed per call; an OpenAI-style additive penalty as a
  logits processor) instead of dropping them.
- requests are grouped by generation settings, since one `generate` call takes one config;
- OpenAI leaves the stop sequence out of the text; the engine keeps it, so we cut it.
- a failing batch is retried request by request, so one bad request fails alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine
from transformers import LogitsProcessor, LogitsProcessorList

from core.config import Settings
from workers.engine import (
    FinishReason,
    GenParams,
    GenRequest,
    GenResult,
    ModelFacts,
    ModelSpec,
    truncate_at_stop,
)

logger = logging.getLogger(__name__)


class PenaltyProcessor(LogitsProcessor):
    """OpenAI's presence/frequency penalties: logits -= presence*[seen] + frequency*count,
    counted over generated tokens only (the prompt is left padded, so generated tokens
    are the columns past the first call's width)."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence = presence
        self.frequency = frequency
        self.prompt_width: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        penalised = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        return cast(torch.FloatTensor, penalised)


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _device_map(name: str) -> str:
    if name == "auto" and not torch.cuda.is_available():
        return "cpu"
    return name


class SwiftEngine:
    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.max_batch_size = settings.max_batch_size
        t0 = time.monotonic()
        self.engine = TransformersEngine(
            str(spec.path),
            model_type=spec.model_type or None,
            template_type=spec.template or None,
            adapters=spec.adapters or None,
            torch_dtype=_dtype(settings.torch_dtype),
            device_map=_device_map(settings.device_map),
            max_batch_size=settings.max_batch_size,
        )
        self.facts = ModelFacts(
            model_id=settings.model_id,
            context_length=int(self.engine.model_info.max_model_len or self.engine.template.max_length),
            demo=spec.demo,
        )
        # Per-call extras the wrapped `generate` reads; one call runs at a time per child.
        self._extras: list[LogitsProcessor] = []
        self._lock = threading.Lock()
        self._orig_generate: Callable[..., Any] = self.engine.template.generate
        self.engine.template.generate = self._generate
        logger.info("loaded %s in %.1fs (demo=%s)", spec.path, time.monotonic() - t0, spec.demo)

    def _generate(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        if self._extras:
            procs = kwargs.get("logits_processor") or LogitsProcessorList()
            procs.extend(self._extras)
            kwargs["logits_processor"] = procs
        return self._orig_generate(model, *args, **kwargs)

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.engine.template.encode(InferRequest(messages=messages))["input_ids"])

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult | Exception]:
        results: list[GenResult | Exception | None] = [None] * len(requests)
        groups: dict[GenParams, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[req.params].append(i)
        with self._lock:
            for params, idxs in groups.items():
                for start in range(0, len(idxs), self.max_batch_size):
                    chunk = idxs[start : start + self.max_batch_size]
                    outs = self._run_isolated([requests[i] for i in chunk], params)
                    for i, out in zip(chunk, outs, strict=True):
                        results[i] = out
        return [r if r is not None else RuntimeError("no result") for r in results]

    def _run_isolated(self, reqs: list[GenRequest], params: GenParams) -> list[GenResult | Exception]:
        try:
            return self._run(reqs, params)
        except Exception as exc:
            if len(reqs) == 1:
                logger.warning("request %s failed: %s", reqs[0].tag, exc)
                return [exc]
            logger.warning("batch of %d failed (%s); retrying one by one", len(reqs), exc)
            return [self._run_isolated([r], params)[0] for r in reqs]

    def _run(self, reqs: list[GenRequest], params: GenParams) -> list[GenResult | Exception]:
        config = RequestConfig(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop),
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        self._extras = []
        if params.presence_penalty or params.frequency_penalty:
            self._extras = [PenaltyProcessor(params.presence_penalty, params.frequency_penalty)]
        try:
            outs = self.engine.infer(
                [InferRequest(messages=r.messages) for r in reqs], config, use_tqdm=False
            )
        finally:
            self._extras = []
        return [self._to_result(out, params) for out in outs]

    @staticmethod
    def _to_result(out: Any, params: GenParams) -> GenResult | Exception:
        if isinstance(out, Exception):
            return out
        choice = out.choices[0]
        text, stopped = truncate_at_stop(choice.message.content or "", params.stop)
        finish: FinishReason = "stop" if stopped or choice.finish_reason == "stop" else "length"
        return GenResult(text, finish, out.usage.prompt_tokens, out.usage.completion_tokens)


class SwiftPromptCounter:
    """The template without the model: exact prompt counts for validation in the API."""

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        from swift.model import get_processor
        from swift.template import get_template

        processor = get_processor(str(spec.path), model_type=spec.model_type or None)
        self.template = get_template(processor, template_type=spec.template or None)
        self.facts = ModelFacts(
            model_id=settings.model_id, context_length=int(self.template.max_length or 0), demo=spec.demo
        )

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.template.encode(InferRequest(messages=messages))["input_ids"])
