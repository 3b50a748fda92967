"""Per-row settings inside one `generate` (workers.engines.rows), on tensors: each row is sampled,
penalised and stopped by its own settings, whatever its batch-mates ask."""

from __future__ import annotations

from typing import cast

import pytest
import torch

from workers.engine import GenParams
from workers.engines.rows import RowLimits, RowPenalties, RowSampler

GREEDY = GenParams(max_tokens=8, temperature=0.0)


def _pick(sampler: RowSampler, scores: torch.Tensor, step: int = 0) -> list[int]:
    """The tokens the sampler picks at generation step `step` (the prompt is 3 tokens)."""
    ids = cast(torch.LongTensor, torch.zeros(scores.shape[0], 3 + step, dtype=torch.long))
    out = sampler(ids, cast(torch.FloatTensor, scores.clone()))
    return [int(t) for t in out.argmax(-1)]


def test_greedy_rows_are_left_exactly_as_they_are() -> None:
    scores = torch.randn(3, 64)
    sampler = RowSampler([GREEDY, GenParams(max_tokens=8, temperature=1.0), GREEDY])
    out = sampler(
        cast(torch.LongTensor, torch.zeros(3, 1, dtype=torch.long)), cast(torch.FloatTensor, scores)
    )
    assert torch.equal(out[0], scores[0]) and torch.equal(out[2], scores[2])
    assert int((out[1] == 0).sum()) == 1 and int(torch.isinf(out[1]).sum()) == 63  # one-hot


def test_all_greedy_costs_nothing() -> None:
    sampler = RowSampler([GREEDY, GREEDY])
    assert not sampler.active
    scores = torch.randn(2, 16)
    assert sampler(cast(torch.LongTensor, torch.zeros(2, 1)), cast(torch.FloatTensor, scores)) is scores


def test_a_seeded_row_draws_the_same_tokens_whatever_its_batch_mates() -> None:
    seeded = GenParams(max_tokens=8, temperature=1.0, seed=1234)
    mates = [
        GenParams(max_tokens=8, temperature=0.7, top_p=0.5),
        GenParams(max_tokens=8, temperature=1.3, top_k=3),
        GREEDY,
    ]
    steps = [torch.randn(1, 128) for _ in range(20)]
    alone = RowSampler([seeded])
    together = RowSampler([*mates, seeded])
    picked = []
    for step, s in enumerate(steps):
        batch = torch.cat([torch.randn(3, 128), s])
        picked += _pick(alone, s, step)
        assert picked[-1:] == _pick(together, batch, step)[-1:]
    assert len(set(picked)) > 5  # a sample, not one token over and over


def test_top_k_one_and_a_tiny_top_p_are_argmax() -> None:
    scores = torch.randn(2, 256)
    sampler = RowSampler(
        [
            GenParams(max_tokens=8, temperature=1.5, top_k=1),
            GenParams(max_tokens=8, temperature=1.5, top_p=1e-6),
        ]
    )
    for step in range(10):
        assert _pick(sampler, scores, step) == [int(t) for t in scores.argmax(-1)]


def test_each_sampled_row_follows_its_own_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(2, 1)
    hot, cold = GenParams(max_tokens=8, temperature=2.0), GenParams(max_tokens=8, temperature=0.5, top_k=2)
    sampler = RowSampler([hot, cold])
    counts = torch.zeros(2, 4)
    draws = 4000
    for step in range(draws):
        for row, tok in enumerate(_pick(sampler, logits, step)):
            counts[row, tok] += 1
    want_hot = (logits[0] / 2.0).softmax(-1)
    want_cold = torch.cat([(logits[1, :2] / 0.5).softmax(-1), torch.zeros(2)])
    assert torch.allclose(counts[0] / draws, want_hot, atol=0.03)
    assert torch.allclose(counts[1] / draws, want_cold, atol=0.03)


def test_penalties_are_per_row_and_count_generated_tokens_only() -> None:
    proc = RowPenalties(
        [GenParams(max_tokens=8), GenParams(max_tokens=8, presence_penalty=1.0, frequency_penalty=0.5)]
    )
    prompt = torch.tensor([[5, 5], [5, 5]])
    scores = torch.zeros(2, 8)
    assert torch.equal(proc(cast(torch.LongTensor, prompt), cast(torch.FloatTensor, scores)), scores)
    ids = torch.cat([prompt, torch.tensor([[3, 3], [3, 3]])], dim=1)
    out = proc(cast(torch.LongTensor, ids), cast(torch.FloatTensor, torch.zeros(2, 8)))
    assert torch.equal(out[0], torch.zeros(8))
    assert out[1, 3] == pytest.approx(-(1.0 + 2 * 0.5)) and out[1, 5] == 0.0  # the prompt's 5 is free


def test_each_row_stops_at_its_own_limit_and_stop_sequence() -> None:
    params = [
        GenParams(max_tokens=2),
        GenParams(max_tokens=5, stop=("xy",)),
        GenParams(max_tokens=5),
    ]
    vocab = {1: "a", 2: "x", 3: "y"}
    limits = RowLimits(params, lambda tails: ["".join(vocab.get(t, "?") for t in tail) for tail in tails])
    prompt = [[0, 0], [0, 0], [0, 0]]
    steps = [[1, 2, 1], [1, 3, 1], [1, 1, 1]]  # row 1 says "x" then "y": its stop
    seen = []
    ids = prompt
    for step in steps:
        ids = [[*row, tok] for row, tok in zip(ids, step, strict=True)]
        done = limits(cast(torch.LongTensor, torch.tensor(ids)), cast(torch.FloatTensor, torch.zeros(3, 4)))
        seen.append([bool(x) for x in done])
    assert seen == [[False, False, False], [True, True, False], [True, True, False]]
    assert limits.stopped == {1}
