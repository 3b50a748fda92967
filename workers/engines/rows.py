"""Per-row generation settings inside one HF `generate` call.

Why: one `generate` takes one `GenerationConfig`, so a worker used to share a call only between requests
with identical settings, and real traffic (every client its own `max_tokens`,
`temperature`, `stop`) ran at ~1 row per call. Here the call itself is greedy with the
largest row's token limit, and each row gets its own settings back from three hooks that
HF applies per step:

- `RowSampler` (a logits processor, last in the chain) samples each non-greedy row with its
  own temperature / top-k / top-p and hands HF a one-hot row, so HF's argmax takes exactly
  that token. Greedy rows are left untouched: their tokens are what the same request gives
  alone. A row's randomness is a hash of its seed and token position (`gumbel_noise`), so a
  seeded row's text depends on its seed and not on its call-mates.
- `RowPenalties`: OpenAI's presence / frequency penalties, per row (ms-swift ignores both).
- `RowLimits` (a stopping criterion): a row stops at its own `max_tokens`, or once its text
  holds one of its own stop sequences.

Only the worker child imports this module (torch).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from transformers import LogitsProcessor, StoppingCriteria

from workers.engine import GenParams
from workers.engines.guide import GrammarBook, LogprobTrail, apply_grammars, consume, record_logprobs


class RowPenalties(LogitsProcessor):
    """logits -= presence*[seen] + frequency*count, per row, counted over generated tokens
    only (prompts are left padded, so generated tokens are the columns past the first
    call's width)."""

    def __init__(self, params: Sequence[GenParams]) -> None:
        self.presence = [p.presence_penalty for p in params]
        self.frequency = [p.frequency_penalty for p in params]
        self.prompt_width: int | None = None
        self._t: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        if self._t is None:
            dev, dt = scores.device, scores.dtype
            self._t = (
                torch.tensor(self.presence, device=dev, dtype=dt)[:, None],
                torch.tensor(self.frequency, device=dev, dtype=dt)[:, None],
            )
        presence, frequency = self._t
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        penalised = scores - frequency * counts - presence * (counts > 0).to(scores.dtype)
        return cast(torch.FloatTensor, penalised)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise for (row seed, token position, vocabulary index), from a counter-based
    hash (splitmix64's finaliser) instead of a stateful generator.

    Why: argmax(logits / T + noise) is an exact sample of softmax(logits / T), and the noise
    of a row depends only on its seed and position, so a seeded row gives the same text
    whatever rows share its forward pass, in a static call or a continuous one, with no
    per-row generator and no host round trip per step."""
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.long)[None, :]
    x = seeds[:, None] * _GOLDEN + steps[:, None] * _MIX1 + idx * _MIX2
    x = x ^ _shr(x, 30)
    x = x * _MIX1
    x = x ^ _shr(x, 27)
    x = x * _MIX2
    x = x ^ _shr(x, 31)
    u = (_shr(x, 40).to(torch.float32) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


def shape_logits(
    scores: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor | None = None,
    truncate: bool = True,
) -> torch.Tensor:
    """Each row's logits as it samples them: over its temperature, cut to its top-k, top-p
    and min-p (columns [B] each; top_k 0 or >= vocab: off; greedy rows' are meaningless)."""
    vocab = scores.shape[1]
    top_k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    logits = scores.float() / temperature.clamp(min=1e-6)[:, None]
    if truncate:
        # the cut is found in sorted order and applied in vocabulary order
        ranked, order = logits.sort(dim=-1, descending=True, stable=True)
        ranks = torch.arange(scores.shape[1], device=scores.device)[None, :]
        cut = ranks >= top_k[:, None]
        probs = ranked.masked_fill(cut, float("-inf")).softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        cut |= ((probs.cumsum(-1) - probs) > top_p[:, None]) & (top_p[:, None] < 1.0)
        if min_p is not None:  # vLLM's min_p: below min_p times the most likely token's
            cut |= probs < (min_p[:, None] * probs[:, :1])
        logits = logits.masked_fill(torch.zeros_like(cut).scatter_(1, order, cut), float("-inf"))
    return logits


def sample(
    scores: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    truncate: bool = True,
    min_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: argmax where temperature is 0, else a sample of the row's own
    distribution; and the shaped logits (`drawn_from` makes them a row's distribution)."""
    greedy = scores.argmax(-1)
    logits = shape_logits(scores, temperature, top_p, top_k, min_p, truncate)
    drawn = (logits + gumbel_noise(seeds, steps, scores.shape[1])).argmax(-1)
    return torch.where(temperature > 0, drawn, greedy), logits


def drawn_from(scores: torch.Tensor, logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """The logits each row's token was drawn from, for its logprobs: a sampled row's shaped
    logits, a greedy row's scores as they are (the distribution OpenAI reports at
    temperature 0). Only for steps that record logprobs: a [B, vocab] tensor."""
    return torch.where((temperature > 0)[:, None], logits, scores.float())


def random_seed() -> int:
    return secrets.randbits(62)


def repeat_penalise(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's (and vLLM's) repetition penalty: a seen token's positive logit divided by the
    row's penalty, a negative one multiplied (`seen`: [B, V] bool, `penalty`: [B])."""
    p = penalty[:, None].to(scores.dtype)
    penalised = torch.where(scores > 0, scores / p, scores * p)
    return torch.where(seen, penalised, scores)


def bias_and_bans(scores: torch.Tensor, row: int, p: GenParams, step: int, stop_ids: Sequence[int]) -> None:
    """In place: the row's logit_bias, and no end token before min_tokens (or ever, with
    ignore_eos)."""
    pairs = [(t, b) for t, b in p.logit_bias if t < scores.shape[1]]
    if pairs:
        ids = [t for t, _ in pairs]
        scores[row, ids] += torch.tensor([b for _, b in pairs], device=scores.device, dtype=scores.dtype)
    if stop_ids and (p.ignore_eos or step < p.min_tokens):
        scores[row, list(stop_ids)] = float("-inf")


class RowSampler(LogitsProcessor):
    """Picks each row's token by its own settings inside a greedy `generate`, and hands HF
    a one-hot row for it: temperature / top-k / top-p / min-p and seed, repetition penalty,
    logit bias, min_tokens and ignore_eos, its grammar (structured outputs, enforced tool
    calls) and its logprobs. Rows that need none of it are left as they are (HF's argmax
    takes their token, exactly as alone)."""

    def __init__(
        self,
        params: Sequence[GenParams],
        default_top_k: int = 0,
        book: GrammarBook | None = None,
        stop_ids: Sequence[int] = (),
    ) -> None:
        self.rows = [i for i, p in enumerate(params) if p.picks]
        picked = [params[i] for i in self.rows]
        self.params = picked
        self.temperature = [p.temperature for p in picked]
        self.top_p = [p.top_p for p in picked]
        self.top_k = [default_top_k if p.top_k is None else p.top_k for p in picked]
        self.min_p = [p.min_p for p in picked]
        self.seeds = [random_seed() if p.seed is None else p.seed for p in picked]
        self.stop_ids = list(stop_ids)
        # j: a row's position among the picked rows
        grammars = [(j, p.grammar) for j, p in enumerate(picked) if p.grammar is not None]
        if grammars and book is None:
            raise ValueError("a row has a grammar but the engine has no grammar book")
        self.matchers = {j: book.matcher(g) for j, g in grammars} if book is not None else {}
        self.trails = {j: LogprobTrail(p.logprobs) for j, p in enumerate(picked) if p.logprobs is not None}
        #: positions that took an end token: nothing more is fed to their matcher or trail
        self.ended: set[int] = set()
        self.prompt_width: int | None = None
        self._dev: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def trail(self, row: int) -> LogprobTrail | None:
        """The logprobs of row `row`, if it asked for them."""
        return self.trails.get(self.rows.index(row)) if row in self.rows else None

    def _setup(self, scores: torch.Tensor) -> dict[str, Any]:
        dev, vocab = scores.device, scores.shape[1]
        return {
            "rows": torch.tensor(self.rows, device=dev),
            "temperature": torch.tensor(self.temperature, device=dev, dtype=torch.float32),
            "top_p": torch.tensor(self.top_p, device=dev, dtype=torch.float32),
            "top_k": torch.tensor(self.top_k, device=dev),
            "min_p": torch.tensor(self.min_p, device=dev, dtype=torch.float32) if any(self.min_p) else None,
            "truncate": any(p < 1.0 for p in self.top_p)
            or any(0 < k < vocab for k in self.top_k)
            or any(self.min_p),
            "seeds": torch.tensor(self.seeds, device=dev, dtype=torch.long),
            "repeat": torch.tensor([p.repetition_penalty for p in self.params], device=dev)
            if any(p.repetition_penalty != 1.0 for p in self.params)
            else None,
        }

    def _adjust(self, sub: torch.Tensor, input_ids: torch.Tensor, step: int) -> torch.Tensor:
        d = self._dev
        assert d is not None
        if d["repeat"] is not None:
            ids = input_ids.index_select(0, d["rows"])
            seen = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, ids, True)
            sub = repeat_penalise(sub, seen, d["repeat"])
        for j, p in enumerate(self.params):
            bias_and_bans(sub, j, p, step, self.stop_ids)
        live = [j for j in self.matchers if j not in self.ended]
        if live:
            sub = apply_grammars(sub, live, [self.matchers[j] for j in live], self.stop_ids)
        return sub

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        if self._dev is None:
            self._dev = self._setup(scores)
            self.prompt_width = input_ids.shape[1]
        d = self._dev
        assert self.prompt_width is not None
        step = input_ids.shape[1] - self.prompt_width
        sub = self._adjust(scores.index_select(0, d["rows"]), input_ids, step)
        steps = torch.full_like(d["seeds"], step)
        tokens, logits = sample(
            sub, d["temperature"], d["top_p"], d["top_k"], d["seeds"], steps, d["truncate"], d["min_p"]
        )
        if self.trails or self.matchers:
            self._note(tokens, sub, logits, d["temperature"])
        out = scores.index_fill(0, d["rows"], float("-inf"))
        out[d["rows"], tokens] = 0.0
        return cast(torch.FloatTensor, out)

    def _note(
        self, tokens: torch.Tensor, sub: torch.Tensor, logits: torch.Tensor, temperature: torch.Tensor
    ) -> None:
        """The step's tokens (one host read) into the guided rows' matchers, the logprobs of
        the rows still running, and which rows took an end token."""
        live = [
            j
            for j in self.trails
            if j not in self.ended and len(self.trails[j].steps) < self.params[j].max_tokens
        ]
        if live:
            record_logprobs(
                drawn_from(sub, logits, temperature), tokens, live, [self.trails[j] for j in live]
            )
        picked = tokens.tolist()
        guided = {j: m for j, m in self.matchers.items() if j not in self.ended}
        consume(guided, {j: picked[j] for j in guided}, self.stop_ids)
        self.ended |= {j for j, t in enumerate(picked) if t in self.stop_ids}


def stop_window(stops: Sequence[str]) -> int:
    """How many of a row's last tokens to decode to see a stop sequence that its newest
    token completes: a token is at least one byte, so a stop spans at most its byte length."""
    return max((len(s.encode()) for s in stops), default=0) + 1


class RowLimits(StoppingCriteria):
    """Each row stops at its own `max_tokens`, or once its text holds one of its stop
    sequences (checked on the last few tokens, only for rows that have stops)."""

    def __init__(self, params: Sequence[GenParams], decode: Callable[[list[list[int]]], list[str]]) -> None:
        self.max_tokens = [p.max_tokens for p in params]
        self.stops = [tuple(s for s in p.stop if s) for p in params]
        self.decode = decode
        self.window = [stop_window(st) for st in self.stops]
        self.with_stops = [i for i, st in enumerate(self.stops) if st]
        #: rows that ended on a stop sequence (their finish_reason is "stop")
        self.stopped: set[int] = set()
        self.prompt_width: int | None = None
        self._limits: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **_: Any) -> torch.BoolTensor:
        if self.prompt_width is None:  # called once a token was appended
            self.prompt_width = input_ids.shape[1] - 1
            self._limits = torch.tensor(self.max_tokens, device=input_ids.device)
        generated = input_ids.shape[1] - self.prompt_width
        assert self._limits is not None
        done = self._limits <= generated
        live = [i for i in self.with_stops if i not in self.stopped and self.max_tokens[i] >= generated]
        if live:
            width = min(max(self.window[i] for i in live), generated)
            rows = input_ids[live, -width:].tolist()  # one device read for all of them
            tails = [row[-min(self.window[i], width) :] for i, row in zip(live, rows, strict=True)]
            for i, text in zip(live, self.decode(tails), strict=True):
                if any(s in text for s in self.stops[i]):
                    self.stopped.add(i)
        if self.stopped:
            done = done.clone()
            done[list(self.stopped)] = True
        return cast(torch.BoolTensor, done)
