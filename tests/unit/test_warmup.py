"""The worker child's warm-up: which batch sizes it runs, and that it runs them on the real
engine (one HF `generate` call per size, with that many rows)."""

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core.config import Settings
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE
from tasks.child import warm_up, warmup_sizes


def test_auto_sweeps_every_batch_size_on_a_gpu_and_one_on_a_cpu() -> None:
    assert warmup_sizes("auto", 4, accelerator=True) == [1, 2, 3, 4]
    assert warmup_sizes("auto", 32, accelerator=False) == [1]


def test_a_list_is_kept_within_1_and_max_batch_size() -> None:
    assert warmup_sizes("8,1,64,8", 32, accelerator=False) == [1, 8, 32]
    assert warmup_sizes("0", 32, accelerator=True) == [1]


def test_a_malformed_list_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="warmup_batch_sizes"):
        Settings(warmup_batch_sizes="1,x")


def test_warm_up_runs_each_size_as_one_batch_on_the_real_engine(demo_model: Path) -> None:
    from models.spec import ModelSpec
    from workers.engines.swift import SwiftEngine

    engine = SwiftEngine(
        ModelSpec(demo_model, DEMO_MODEL_TYPE, DEMO_TEMPLATE, demo=True), Settings(max_batch_size=4)
    )
    rows: list[int] = []
    orig = engine._orig_generate

    def spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        rows.append(int(kwargs["input_ids"].shape[0]))
        return orig(model, *args, **kwargs)

    engine._orig_generate = spy
    assert not engine.facts.accelerator  # CI has no GPU: "auto" would warm batch size 1 only
    warm_up(engine, [1, 3, 4])
    assert rows == [1, 3, 4]
