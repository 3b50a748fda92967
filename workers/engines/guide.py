"""Per-row guidance inside a batched engine call: grammar masks (structured outputs and
enforced tool calls) and logprobs.

Why per row: rows with different schemas, and rows with none, share one engine call, in
static and in continuous mode. Each guided row has its own llguidance matcher; a step fills
one bitmask row per guided row (tens of microseconds each, on the CPU) and applies them all
at once; unguided rows are not touched.

Why a cache of pristine matchers: building one from a grammar is the "compile" step (a
fraction of a millisecond for the schemas clients send, up to a second for extreme ones);
each row gets a copy of the cached one, so a schema is compiled once per worker (bounded).
Matchers are made before a row joins a step loop (static: before the call; continuous: in
the drain thread, not in the loop's), so a new schema never stalls its call-mates' steps.

Only the worker child imports this module (torch).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch as llt
import torch

logger = logging.getLogger(__name__)

#: pristine matchers kept per worker (by grammar text)
GRAMMAR_CACHE_SIZE = 256
#: logprob of a token outside the row's distribution (JSON has no -inf; vLLM's value)
NO_CHANCE = -9999.0
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarBook:
    """The engine's tokenizer as llguidance sees it, and its matchers by grammar."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stop_ids)
        self._pristine: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.compiled = 0

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher for one row; raises ValueError for a grammar it cannot take (the
        API checks every schema first, so this is a worker whose llguidance differs)."""
        pristine = self._pristine.get(grammar)
        if pristine is None:
            pristine = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if pristine.is_error():
                raise ValueError(f"the output grammar cannot be used: {pristine.get_error()}")
            self.compiled += 1
            self._pristine[grammar] = pristine
            if len(self._pristine) > GRAMMAR_CACHE_SIZE:
                self._pristine.popitem(last=False)
        else:
            self._pristine.move_to_end(grammar)
        return pristine.deep_copy()

    def token_bytes(self, token: int) -> bytes:
        return bytes(self.tokenizer.decode_bytes([token]))


def apply_grammars(
    scores: torch.Tensor, rows: list[int], matchers: list[llguidance.LLMatcher], stop_ids: Sequence[int]
) -> torch.Tensor:
    """Mask rows[k] of `scores`, in place, to what matchers[k] allows next; returns `scores`.
    A matcher whose grammar is complete (or broken) forces the end of its row (the first of
    `stop_ids`): the model's own settings may forbid the end token (suppress_tokens,
    ignore_eos), the grammar wins."""
    stop_id = stop_ids[0] if stop_ids else 0
    vocab = scores.shape[1]
    mask = llt.allocate_token_bitmask(len(rows), vocab)
    ended: list[int] = []
    for k, m in enumerate(matchers):
        if m.is_stopped() or m.is_error():
            ended.append(rows[k])
        else:
            llt.fill_next_token_bitmask(m, mask, k)
    # bit j of word w allows token 32*w + j; unpacked on the device, one row at a time in place
    packed = mask.to(scores.device, non_blocking=True)
    shifts = _SHIFTS.to(scores.device)
    for k, row in enumerate(rows):
        if row in ended:
            continue
        banned = ((packed[k, :, None] >> shifts) & 1).reshape(-1)[:vocab] == 0
        scores[row].masked_fill_(banned, float("-inf"))
    for row in ended:
        scores[row].fill_(float("-inf"))
        scores[row, stop_id] = 0.0
    return scores


def consume(
    matchers: dict[int, llguidance.LLMatcher], tokens: dict[int, int], stop_ids: Sequence[int]
) -> None:
    """Each row's chosen token into its matcher (an end token ends the matcher's row)."""
    for row, m in matchers.items():
        token = tokens.get(row)
        if token is None or m.is_stopped() or m.is_error() or token in stop_ids:
            continue
        if not m.consume_token(token):
            logger.debug("row %d: the grammar refused token %d (%s)", row, token, m.get_error())


class LogprobTrail:
    """One row's logprobs, token by token, in OpenAI's shape (filled at the end, so a step
    stores only ids and floats)."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.steps: list[tuple[int, float, list[tuple[int, float]]]] = []

    def add(self, token: int, logprob: float, alternatives: list[tuple[int, float]]) -> None:
        self.steps.append((token, logprob, alternatives))

    def entries(self, book: GrammarBook, count: int) -> list[dict[str, Any]]:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            raw = book.token_bytes(token)
            return {
                "token": raw.decode("utf-8", errors="replace"),
                "logprob": max(logprob, NO_CHANCE),
                "bytes": list(raw),
            }

        out = []
        for token, logprob, alts in self.steps[:count]:
            top = [entry(t, lp) for t, lp in alts if lp > float("-inf")]
            out.append({**entry(token, logprob), "top_logprobs": top})
        return out


def record_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], trails: list[LogprobTrail]
) -> None:
    """logprobs of the distribution each row sampled from (`logits`: after its penalties,
    masks, temperature and truncation), for the token it took and its top alternatives."""
    index = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = lp.gather(1, tokens.index_select(0, index)[:, None]).squeeze(1)
    k = max(t.top for t in trails)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    rows_chosen = tokens.index_select(0, index).tolist()
    chosen_l, top_vl, top_il = chosen.tolist(), top_v.tolist(), top_i.tolist()
    for j, trail in enumerate(trails):
        alts = list(zip(top_il[j][: trail.top], top_vl[j][: trail.top], strict=True))
        trail.add(rows_chosen[j], chosen_l[j], alts)
