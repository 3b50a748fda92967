"""What constrained decoding costs: `inferq bench structured`.

Side by side in one run, per demo model size (tiny: overhead-bound on a CPU; small:
compute-bound):
- a backlog of `n` jobs through /v1/jobs where half the rows carry one of three JSON schemas,
  against the same backlog with no schema: tokens/s of each and their ratio (goal >= 0.85 on
  the small model), and the share of structured outputs that validate (goal: every one that
  ended by itself);
- the same two backlogs through the engine called directly (no queue), for the ratio
  without the stack around it;
- per constrained token, the CPU time of the mask (fill and apply) and the matcher's step,
  on the demo vocabulary and on a real one (DeepSeek's tokenizer, which litellm ships);
- a schema's compile time, cold and warm (cached), and the API's check of a schema.

`swift deploy` is not in the table: with the transformers backend it has no constrained
decoding to compare with (its `response_format` needs vLLM).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import redis

from bench._stack import bench_settings, stack
from bench.common import post_all, prompts, wait_done

SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "label": {"enum": ["spam", "ham", "eggs"]},
        },
        "required": ["name", "age", "label"],
    },
    {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        },
        "required": ["sentiment", "score", "tags"],
    },
    {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "where": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -50, "maximum": 50},
                    "unit": {"enum": ["m", "km"]},
                },
                "required": ["x", "unit"],
            },
        },
        "required": ["ok", "where"],
    },
]


def _fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def backlog(n: int, max_tokens: int, lengths: list[int] | None = None) -> list[dict[str, Any]]:
    """`n` seeded requests (temperature 0.7, seed i), every other one with a schema. With
    `lengths`, the same requests unconstrained, each row limited to the tokens its constrained
    run made: both backlogs then make the same tokens in the same rows (a seeded row's text
    does not depend on its batch-mates), so their ratio is the cost of the constraint alone,
    not of structured rows ending early."""
    out = []
    for i, p in enumerate(prompts(n)):
        body: dict[str, Any] = {
            "model": "tiny",
            "messages": [{"role": "user", "content": p}],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": i,
        }
        if i % 2 == 0:
            if lengths is None:
                body["response_format"] = _fmt(SCHEMAS[(i // 2) % len(SCHEMAS)])
            else:
                body["max_tokens"] = max(1, lengths[i])
        out.append(body)
    return out


def _valid(bodies: list[dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, int]:
    import jsonschema_rs

    counts = {"structured": 0, "ended": 0, "valid": 0}
    for body, res in zip(bodies, results, strict=True):
        if "response_format" not in body:
            continue
        counts["structured"] += 1
        choice = res["choices"][0]
        if choice["finish_reason"] != "stop":
            continue
        counts["ended"] += 1
        try:
            jsonschema_rs.validate(
                body["response_format"]["json_schema"]["schema"], json.loads(choice["message"]["content"])
            )
            counts["valid"] += 1
        except (ValueError, jsonschema_rs.ValidationError):
            pass
    return counts


def _stack_round(base: str, r: redis.Redis, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    t0 = time.time()
    ids, _ = asyncio.run(post_all(base, bodies))
    records = wait_done(r, ids)
    wall = max(float(rec["finished_at"]) for rec in records) - t0
    results = [json.loads(rec["result"]) for rec in records]
    lengths = [res["usage"]["completion_tokens"] for res in results]
    return {"tokens_per_s": sum(lengths) / wall, "lengths": lengths, **_valid(bodies, results)}


def _direct_round(engine: Any, bodies: list[dict[str, Any]]) -> float:
    from schemas.openai import ChatCompletionRequest
    from workers.runner import gen_requests

    gen = [g for b in bodies for g in gen_requests(ChatCompletionRequest(**b), 512)]
    t0 = time.perf_counter()
    outs = engine.generate(gen)
    wall = time.perf_counter() - t0
    return sum(o.completion_tokens for o in outs if not isinstance(o, Exception)) / wall


def _size(size: str, n: int, batch: int, max_tokens: int, rounds: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    with stack(size=size, INFERQ_MAX_BATCH_SIZE=str(batch)) as (base, model, env, _sup):
        r = redis.Redis.from_url(env["INFERQ_REDIS_URL"], decode_responses=True)
        # warm-up: schemas compiled, and each row's constrained length learnt
        lengths = _stack_round(base, r, backlog(n, max_tokens))["lengths"]
        bodies = {"structured": backlog(n, max_tokens), "plain": backlog(n, max_tokens, lengths)}
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "structured": []}
        for i in range(rounds):  # alternating: this VM's speed drifts over tens of seconds
            for kind in ("plain", "structured") if i % 2 == 0 else ("structured", "plain"):
                runs[kind].append(_stack_round(base, r, bodies[kind]))
                print(
                    f"  {size} {kind} round {i + 1}: {runs[kind][-1]['tokens_per_s']:.0f} tok/s", flush=True
                )
    for kind, got in runs.items():
        res[f"stack_{kind}_tokens_per_s"] = round(statistics.median(g["tokens_per_s"] for g in got), 1)
    res["stack_ratio"] = round(res["stack_structured_tokens_per_s"] / res["stack_plain_tokens_per_s"], 3)
    res["structured_outputs"] = sum(g["structured"] for g in runs["structured"])
    res["structured_ended"] = sum(g["ended"] for g in runs["structured"])
    res["structured_valid"] = sum(g["valid"] for g in runs["structured"])
    # seeded rows: the same lengths in every round, whatever their batch-mates
    res["lengths_stable"] = all(g["lengths"] == lengths for g in runs["structured"])

    from workers.engines import load_engine

    engine = load_engine(bench_settings(model, batch))
    _direct_round(engine, bodies["structured"][: batch * 2])  # warm-up
    direct: dict[str, list[float]] = {"plain": [], "structured": []}
    for i in range(rounds):
        for kind in ("plain", "structured") if i % 2 == 0 else ("structured", "plain"):
            direct[kind].append(_direct_round(engine, bodies[kind]))
    for kind, vals in direct.items():
        res[f"direct_{kind}_tokens_per_s"] = round(statistics.median(vals), 1)
    res["direct_ratio"] = round(res["direct_structured_tokens_per_s"] / res["direct_plain_tokens_per_s"], 3)
    return res


def _large_tokenizer() -> Any:
    """A real vocabulary (DeepSeek's, ~128k tokens, shipped inside litellm), or None."""
    import importlib.util

    from transformers import PreTrainedTokenizerFast

    spec = importlib.util.find_spec("litellm")  # not imported: it fetches a price list at import
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers" / "deepseek_tokenizer.json"
    return (
        PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<\uff5cend\u2581of\u2581sentence\uff5c>")
        if path.exists()
        else None
    )


def mask_cost(tokenizer: Any, steps: int = 400) -> dict[str, float]:
    """CPU per constrained token: fill the row's mask, apply it to a logits row, take the
    best allowed token, step the matcher; and a schema's compile cold and warm."""
    import torch

    from schemas.grammar import check_request_grammar, request_grammar
    from schemas.structured import JsonSchemaFormat
    from workers.engines.guide import GrammarBook, apply_grammars, consume

    vocab = len(tokenizer)
    book = GrammarBook(tokenizer, vocab, [int(tokenizer.eos_token_id)])
    formats = [
        JsonSchemaFormat.model_validate({"type": "json_schema", "json_schema": _fmt(s)["json_schema"]})
        for s in SCHEMAS
    ]
    grammars = [request_grammar(f, None, None, None) for f in formats]
    t0 = time.perf_counter()
    matchers = [book.matcher(g) for g in grammars if g is not None]
    cold = (time.perf_counter() - t0) / len(matchers)
    t0 = time.perf_counter()
    for g in grammars:
        assert g is not None
        book.matcher(g)
    warm = (time.perf_counter() - t0) / len(grammars)
    t0 = time.perf_counter()
    for f in formats:
        check_request_grammar(f, None, None, None)
    check = (time.perf_counter() - t0) / len(formats)
    logits = torch.randn(len(matchers), vocab, generator=torch.Generator().manual_seed(0))
    made = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        live = [k for k, m in enumerate(matchers) if not m.is_stopped()]
        if not live:
            matchers = [book.matcher(g) for g in grammars if g is not None]
            continue
        scores = logits[: len(live)].clone()
        masked = apply_grammars(scores, list(range(len(live))), [matchers[k] for k in live], book.stop_ids)
        picked = masked.argmax(-1).tolist()
        consume({j: matchers[k] for j, k in enumerate(live)}, dict(enumerate(picked)), book.stop_ids)
        made += len(live)
    per_token = (time.perf_counter() - t0) / made
    return {
        "vocab": vocab,
        "us_per_constrained_token": round(per_token * 1e6, 1),
        "compile_cold_ms": round(cold * 1e3, 3),
        "compile_warm_ms": round(warm * 1e3, 3),
        "api_check_ms": round(check * 1e3, 3),
    }


def structured(n: int = 256, batch: int = 16, max_tokens: int = 64, rounds: int = 3) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from bench._stack import bench_model

    res: dict[str, Any] = {"n": n, "max_batch_size": batch, "max_tokens": max_tokens, "rounds": rounds}
    for size in ("tiny", "small"):
        for key, value in _size(size, n, batch, max_tokens, rounds).items():
            res[f"{size}_{key}"] = value
        print(
            f"structured {size}: stack x{res[f'{size}_stack_ratio']}, direct x{res[f'{size}_direct_ratio']}"
        )
    res["demo_vocab"] = mask_cost(AutoTokenizer.from_pretrained(bench_model("tiny")))
    if (large := _large_tokenizer()) is not None:
        res["large_vocab"] = mask_cost(large)
    print(f"mask cost: {res['demo_vocab']} / {res.get('large_vocab')}")
    return res
