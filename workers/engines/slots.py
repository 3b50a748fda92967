"""Per-row settings in continuous mode: `SlotSampler`, the manager's logits processor.

Why our own processor: transformers' continuous batching samples for the loop as a whole
(one `do_sample`), and its per-request processors cover only temperature, top-k and
top-p. The loop runs greedy, and this processor picks each row's token by that row's own
settings (`workers.engines.rows`: temperature / top-k / top-p / min-p, seed, presence, frequency and
repetition penalties, logit bias, min_tokens, ignore_eos), its grammar (`workers.engines.guide`) and
records its logprobs. Sampling settings live in per-slot tables on the device (no host round
trip per step); the host is asked for the step's tokens only while a row has a grammar or
wants logprobs.

Only the worker child imports this module (torch).
"""

from __future__ import annotations

from typing import Any

import llguidance
import torch

from workers.engine import GenParams
from workers.engines.guide import LogprobTrail, apply_grammars, consume, record_logprobs
from workers.engines.hf_batching import ContinuousBatchingLogitsProcessor, processor_kwargs
from workers.engines.rows import bias_and_bans, drawn_from, random_seed, repeat_penalise, sample

#: the request kwarg that names a row's slot
SLOT_KWARG = "inferq_slot"


class SlotSampler(ContinuousBatchingLogitsProcessor):
    """Each row's token by its own settings, read from per-slot tables (slot 0: greedy, for
    requests that are not ours, such as the manager's warm-up)."""

    supported_kwargs: dict[str, type] = {SLOT_KWARG: int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(
        self, slots: int, device: torch.device, vocab: int, stop_ids: list[int] | None = None
    ) -> None:
        self.slots, self.device = slots, device
        self.stop_ids = list(stop_ids or [])
        self.temperature = torch.zeros(slots, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.top_k = torch.zeros(slots, dtype=torch.long, device=device)
        self.min_p = torch.zeros(slots, device=device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=device)
        self.presence = torch.zeros(slots, device=device)
        self.frequency = torch.zeros(slots, device=device)
        self.repeat = torch.ones(slots, device=device)
        self.steps = torch.zeros(slots, dtype=torch.long, device=device)
        self.counts: torch.Tensor | None = None  # [slots, vocab] generated-token counts, with penalties
        #: prompt and output tokens of each slot, for the repetition penalty
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        #: host-side: which slots sample, truncate, penalise (no device read per step)
        self.sampling: set[int] = set()
        self.truncating: set[int] = set()
        self.penalised: set[int] = set()
        self.repeating: set[int] = set()
        #: slots whose settings need the host each step: their params and tokens made so far
        self.hosted: dict[int, GenParams] = {}
        self.made: dict[int, int] = {}
        self.matchers: dict[int, llguidance.LLMatcher] = {}
        self.trails: dict[int, LogprobTrail] = {}
        #: generation steps and rows run (occupancy); read and reset by the engine
        self.steps_run = 0
        self.rows_run = 0
        #: rows over every step, never taken: one token each (the heartbeat's tokens/s)
        self.rows_total = 0

    def assign(
        self,
        slot: int,
        p: GenParams,
        default_top_k: int,
        prompt: list[int] | None = None,
        matcher: llguidance.LLMatcher | None = None,
    ) -> None:
        top_k = default_top_k if p.top_k is None else p.top_k
        self.temperature[slot] = p.temperature
        self.top_p[slot] = p.top_p
        self.top_k[slot] = top_k
        self.min_p[slot] = p.min_p
        self.seeds[slot] = random_seed() if p.seed is None else p.seed
        self.presence[slot] = p.presence_penalty
        self.frequency[slot] = p.frequency_penalty
        self.repeat[slot] = p.repetition_penalty
        self.steps[slot] = 0
        if self.counts is not None:
            self.counts[slot] = 0
        if p.repetition_penalty != 1.0 and prompt:
            self.seen[slot] = False
            self.seen[slot, torch.tensor(prompt, device=self.device)] = True
        self._host(slot, p, matcher)
        if self.device.type == "cuda":
            # the loop reads these on its own stream: they must be written before the request
            # is added
            torch.cuda.current_stream(self.device).synchronize()
        for flag, on in (
            (self.sampling, p.temperature > 0),
            (self.truncating, p.temperature > 0 and (p.top_p < 1.0 or top_k > 0 or p.min_p > 0)),
            (self.penalised, bool(p.presence_penalty or p.frequency_penalty)),
            (self.repeating, p.repetition_penalty != 1.0),
        ):
            if on:
                flag.add(slot)
            else:
                flag.discard(slot)

    def _host(self, slot: int, p: GenParams, matcher: llguidance.LLMatcher | None) -> None:
        if matcher is not None:
            self.matchers[slot] = matcher
        if p.logprobs is not None:
            self.trails[slot] = LogprobTrail(p.logprobs)
        if matcher is not None or p.logprobs is not None or p.logit_bias or p.min_tokens or p.ignore_eos:
            self.hosted[slot] = p
            self.made[slot] = 0

    def trail(self, slot: int) -> LogprobTrail | None:
        return self.trails.get(slot)

    def release(self, slot: int) -> None:
        for flags in (self.sampling, self.truncating, self.penalised, self.repeating):
            flags.discard(slot)
        self.hosted.pop(slot, None)
        self.made.pop(slot, None)
        self.matchers.pop(slot, None)
        self.trails.pop(slot, None)

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        slots = [processor_kwargs(r).get(SLOT_KWARG, 0) for r in requests_with_new_token]
        return torch.tensor(slots, dtype=torch.int32, device="cpu")

    def _adjust(
        self, scores: torch.Tensor, slots: torch.Tensor, hosted: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Penalties, bias, bans and grammar masks of this step's rows (`hosted`: (row, slot)
        of the rows whose settings live on the host)."""
        if self.penalised:
            if self.counts is None:
                self.counts = torch.zeros(self.slots, scores.shape[1], device=scores.device)
            c = self.counts.index_select(0, slots)
            scores = scores - self.frequency[slots, None] * c - self.presence[slots, None] * (c > 0).float()
        if self.repeating:
            scores = repeat_penalise(scores, self.seen.index_select(0, slots), self.repeat[slots])
        if hosted:
            for row, slot in hosted:
                bias_and_bans(scores, row, self.hosted[slot], self.made[slot], self.stop_ids)
            guided = [(row, slot) for row, slot in hosted if slot in self.matchers]
            if guided:
                rows, matchers = [r for r, _ in guided], [self.matchers[s] for _, s in guided]
                scores = apply_grammars(scores, rows, matchers, self.stop_ids)
        return scores

    def __call__(self, logits: torch.FloatTensor, tensor_arg: torch.Tensor) -> torch.FloatTensor:
        rows = logits.shape[0]
        self.steps_run += 1
        self.rows_run += rows
        self.rows_total += rows
        slots = tensor_arg[:rows].long()
        hosted = [(row, s) for row, s in enumerate(slots.tolist()) if s in self.hosted] if self.hosted else []
        scores = self._adjust(logits.clone() if hosted else logits, slots, hosted)
        tokens, sampled = (
            sample(
                scores,
                self.temperature[slots],
                self.top_p[slots],
                self.top_k[slots],
                self.seeds[slots],
                self.steps[slots],
                truncate=bool(self.truncating),
                min_p=self.min_p[slots] if self.truncating else None,
            )
            if self.sampling
            else (scores.argmax(-1), scores)
        )
        self.steps.index_add_(0, slots, torch.ones_like(slots))
        if self.counts is not None:
            self.counts.index_put_(
                (slots, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True
            )
        if self.repeating:
            self.seen.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.bool))
        if hosted:
            self._note(hosted, tokens, scores, sampled, self.temperature[slots])
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, tokens[:, None], 0.0)
        return out  # type: ignore[return-value]

    def _note(
        self,
        hosted: list[tuple[int, int]],
        tokens: torch.Tensor,
        scores: torch.Tensor,
        logits: torch.Tensor,
        temperature: torch.Tensor,
    ) -> None:
        """The step's tokens into the hosted rows' matchers, counts and logprobs."""
        traced = [(row, slot) for row, slot in hosted if slot in self.trails]
        if traced:
            drawn = drawn_from(scores, logits, temperature)
            record_logprobs(drawn, tokens, [r for r, _ in traced], [self.trails[s] for _, s in traced])
        picked = tokens.tolist()
        consume(
            {slot: self.matchers[slot] for _, slot in hosted if slot in self.matchers},
            {slot: picked[row] for row, slot in hosted},
            self.stop_ids,
        )
        for _, slot in hosted:
            self.made[slot] += 1
