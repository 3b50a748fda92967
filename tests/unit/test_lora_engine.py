"""LoRA adapters through PEFT in the real engine (no queue): rows of one call through
different adapters give what each adapter merged into the weights at load gives (the
`--adapters` path), base rows what the base model alone gives; adapters dropped in, changed,
removed and broken."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Settings
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE
from models.spec import ModelSpec
from workers.adapters import pack, scan
from workers.engine import AdapterMissing, GenParams, GenRequest, GenResult
from workers.engines.swift import SwiftEngine

PROMPTS = ["hello there", "tell me a story about a cat", "2 + 2", "what is the capital of France"]


def make_adapter(base: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A tiny random LoRA (init_lora_weights=False, so it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def _engine(base: Path, adapters: list[str] | None = None, cap: int = 0) -> SwiftEngine:
    spec = ModelSpec(base, DEMO_MODEL_TYPE, DEMO_TEMPLATE, adapters=adapters or [], demo=True)
    return SwiftEngine(spec, Settings(max_batch_size=8, max_loaded_adapters=cap))


def _texts(engine: SwiftEngine, rows: list[tuple[str, str]]) -> list[str]:
    reqs = [
        GenRequest(
            messages=[{"role": "user", "content": p}],
            params=GenParams(max_tokens=12, temperature=0),
            adapter=a,
        )
        for p, a in rows
    ]
    out = engine.generate(reqs)
    assert all(isinstance(o, GenResult) for o in out), out
    return [o.text for o in out if isinstance(o, GenResult)]


@pytest.fixture(scope="module")
def lora(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(demo_model, root / "alpha", seed=1)
    make_adapter(demo_model, root / "beta", seed=2)
    yield demo_model, root


def test_mixed_rows_equal_merged_adapters_and_base(lora: tuple[Path, Path]) -> None:
    base, root = lora
    served = _engine(base)
    assert served.sync_adapters(scan(root)) == ["alpha", "beta"]
    rows = [(p, a) for p in PROMPTS for a in ("", "alpha", "beta")]
    mixed = _texts(served, rows)

    plain = _texts(_engine(base), [(p, "") for p in PROMPTS])
    merged = {
        a: _texts(_engine(base, [str(root / a)]), [(p, "") for p in PROMPTS]) for a in ("alpha", "beta")
    }
    for i, p in enumerate(PROMPTS):
        assert mixed[3 * i] == plain[i], p
        assert mixed[3 * i + 1] == merged["alpha"][i], p
        assert mixed[3 * i + 2] == merged["beta"][i], p
    assert merged["alpha"] != plain and merged["beta"] != merged["alpha"]  # the adapters do change it


def test_adapters_change_and_go_and_broken_ones_are_refused(
    lora: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, root = lora
    local = tmp_path / "adapters"
    shutil.copytree(root / "alpha", local / "alpha")
    engine = _engine(base)
    with caplog.at_level(logging.INFO, logger="workers.adapters"):
        assert engine.sync_adapters(scan(local)) == ["alpha"]
    # routine: INFO, which the default console (warnings and errors) leaves out
    assert [r.levelno for r in caplog.records if "adapter 'alpha' served" in r.getMessage()] == [logging.INFO]
    before = _texts(engine, [(PROMPTS[1], "alpha")])

    # a new checkpoint copied over the old one: later calls get the new weights
    shutil.rmtree(local / "alpha")
    make_adapter(base, local / "alpha", seed=7)
    assert engine.sync_adapters(scan(local)) == ["alpha"]
    after = _texts(engine, [(PROMPTS[1], "alpha")])
    assert after != before
    assert after == _texts(_engine(base, [str(local / "alpha")]), [(PROMPTS[1], "")])

    # broken: not LoRA, wrong shapes (another rank's weights under this config), unreadable
    (local / "notlora").mkdir()
    (local / "notlora" / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    (local / "notlora" / "adapter_model.safetensors").write_bytes(b"x")
    make_adapter(base, local / "misfit", seed=3, r=8)
    config = json.loads((local / "misfit" / "adapter_config.json").read_text())
    (local / "misfit" / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    (local / "garbage").mkdir()
    (local / "garbage" / "adapter_config.json").write_text("{not json")
    (local / "garbage" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert engine.sync_adapters(scan(local)) == ["alpha"]
    assert _texts(engine, [(PROMPTS[1], "alpha"), (PROMPTS[0], "")])[0] == after[0]  # still serving
    # for the heartbeat: each refused one with why (the API answers a request for it so)
    refused = engine.adapter_facts()["refused_now"]
    assert sorted(refused) == ["garbage", "misfit", "notlora"] and "IA3" in refused["notlora"]

    # removed: its rows fail alone, the others run; a broken one removed is no longer refused
    shutil.rmtree(local / "alpha")
    shutil.rmtree(local / "garbage")
    with caplog.at_level(logging.INFO, logger="workers.adapters"):
        assert engine.sync_adapters(scan(local)) == []
    assert [r.levelno for r in caplog.records if "'alpha' was removed" in r.getMessage()] == [logging.INFO]
    assert sorted(engine.adapter_facts()["refused_now"]) == ["misfit", "notlora"]
    reqs = [
        GenRequest(
            messages=[{"role": "user", "content": PROMPTS[0]}], params=GenParams(max_tokens=4), adapter=a
        )
        for a in ("alpha", "")
    ]
    out = engine.generate(reqs)
    assert isinstance(out[0], AdapterMissing) and isinstance(out[1], GenResult)
    # and one dropped in again after all were gone
    shutil.copytree(root / "beta", local / "beta")
    assert engine.sync_adapters(scan(local)) == ["beta"]
    assert _texts(engine, [(PROMPTS[2], "beta")]) == _texts(
        _engine(base, [str(root / "beta")]), [(PROMPTS[2], "")]
    )


def test_a_cap_on_loaded_adapters_unloads_the_least_recently_used(lora: tuple[Path, Path]) -> None:
    base, root = lora
    capped = _engine(base, cap=1)
    assert capped.sync_adapters(scan(root)) == ["alpha", "beta"]  # both served, one in memory
    assert len(capped.adapters.loaded) == 1
    rows = [(p, a) for p in PROMPTS[:2] for a in ("beta", "", "alpha")]
    uncapped = _engine(base)
    uncapped.sync_adapters(scan(root))
    assert _texts(capped, rows) == _texts(uncapped, rows)  # one call per adapter, same text
    assert len(capped.adapters.loaded) == 1 and capped.adapters.unloads >= 1


def test_pack_keeps_order_under_the_cap_and_groups_over_it() -> None:
    names = ["a", "", "b", "a", "c", ""]
    assert pack(names, list(range(6)), rows=4, cap=0) == [[0, 1, 2, 3], [4, 5]]
    assert pack(names, list(range(6)), rows=8, cap=3) == [[0, 1, 2, 3, 4, 5]]
    calls = pack(names, list(range(6)), rows=8, cap=1)
    assert sorted(i for c in calls for i in c) == list(range(6))
    assert all(len({names[i] for i in c} - {""}) <= 1 for c in calls)
