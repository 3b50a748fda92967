"""`workers.engines.hf_batching`, the one door to transformers' continuous-batching internals:
it runs a manager on the installed transformers as the continuous engine does, and a
transformers it was not checked on (another version, an attribute gone) is one clear error
when the engine is imported or its manager made, not an AttributeError in the loop."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import ContinuousBatchingManager

from tests.support import ROOT, procs
from workers.engines import hf_batching
from workers.engines.hf_batching import UnsupportedTransformers
from workers.engines.slots import SLOT_KWARG, SlotSampler

RANGE = ">=5.19,<5.20"


@pytest.fixture(scope="module")
def model(demo_model: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(demo_model)


def _config(model: Any) -> ContinuousBatchingConfig:
    """Sized as the engine sizes it without an accelerator (`_cache_size`)."""
    pages = -(-model.config.max_position_embeddings // 256)
    return ContinuousBatchingConfig(
        max_requests_per_batch=2,
        per_request_processors=False,
        allow_block_sharing=False,
        page_size=256,
        num_blocks=2 * pages + 2,
        max_batch_tokens=512,
    )


@pytest.fixture()
def manager(model: Any) -> Iterator[tuple[Any, SlotSampler]]:
    sampler = SlotSampler(3, torch.device("cpu"), model.config.vocab_size)
    gc = GenerationConfig(do_sample=False, max_new_tokens=4, eos_token_id=[])
    m = hf_batching.start_manager(model, gc, _config(model), sampler, warmup=False)
    yield m, sampler
    m.stop(block=True, timeout=10, hard_stop=True)
    model.destroy_cached_continuous_batching_manager()


def test_the_installed_transformers_is_one_it_was_checked_on() -> None:
    hf_batching.check_version()
    hf_batching.check_classes()


def test_a_manager_runs_with_our_processor_in_a_daemon_thread(model: Any, manager: Any) -> None:
    m, sampler = manager
    hf_batching.check_manager(m)
    loop = [t for t in threading.enumerate() if t.name == "inferq-continuous-loop"]
    assert m.is_running() and len(loop) == 1 and loop[0].daemon
    prompt = [1, 2, 3, 4]
    m.add_request(
        prompt, request_id="r1", max_new_tokens=4, streaming=False, eos_token_id=[], **{SLOT_KWARG: 0}
    )
    out = hf_batching.output_queue(m).get(timeout=60)
    assert out.request_id == "r1" and out.is_finished() and out.error is None
    assert sampler.steps_run == 4  # SlotSampler picked every token: slot 0 is greedy
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert list(out.generated_tokens) == ids[0, len(prompt) :].tolist()
    assert hf_batching.fatal_error(m) is None


@pytest.mark.parametrize("version", ["5.20.0", "5.18.2", "6.0.0.dev0", "main"])
def test_a_version_not_checked_is_one_error_naming_it_and_the_range(version: str) -> None:
    with pytest.raises(UnsupportedTransformers) as err:
        hf_batching.check_version(version)
    text = str(err.value)
    assert f"this is transformers {version}:" in text and f"transformers{RANGE}" in text, text
    assert "INFERQ_ENGINE_MODE=static" in text and "hf_batching.py" in text, text


@pytest.mark.parametrize("version", ["5.19.0", "5.19.7", "5.19.1.post1"])
def test_the_releases_of_the_checked_minor_pass(version: str) -> None:
    hf_batching.check_version(version)


def test_importing_the_engine_with_another_transformers_fails_at_once() -> None:
    """(ms-swift puts a transformers module of its own in sys.modules when it loads: the
    version is faked on that one, once the static engine's imports are done.)"""
    code = (
        "import sys, workers.engines.swift\n"
        "sys.modules['transformers'].__version__ = '5.21.0'\n"
        "import workers.engines.continuous\n"
    )
    done = procs.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-3000:]
    assert last.startswith("workers.engines.hf_batching.UnsupportedTransformers: "), done.stderr[-3000:]
    assert f"transformers{RANGE}" in last and "this is transformers 5.21.0" in last, last


def test_a_method_or_argument_gone_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(ContinuousBatchingManager, "_run_generation_loop")

    def stop(self: Any, block: bool = True, timeout: float | None = None) -> None: ...

    monkeypatch.setattr(ContinuousBatchingManager, "stop", stop)
    with pytest.raises(UnsupportedTransformers) as err:
        hf_batching.check_classes()
    text = str(err.value)
    assert (
        "it lacks ContinuousBatchingManager.stop(hard_stop), ContinuousBatchingManager._run_generation_loop"
        in text
    )
    assert f"transformers{RANGE}" in text and "this is transformers 5.19" in text, text


def test_a_manager_without_an_attribute_fails_when_made(model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    made = ContinuousBatchingManager.__init__

    def without_router(self: Any, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        del self.output_router

    monkeypatch.setattr(ContinuousBatchingManager, "__init__", without_router)
    sampler = SlotSampler(3, torch.device("cpu"), model.config.vocab_size)
    try:
        with pytest.raises(UnsupportedTransformers) as err:
            hf_batching.start_manager(
                model, GenerationConfig(do_sample=False), _config(model), sampler, warmup=False
            )
    finally:
        model.destroy_cached_continuous_batching_manager()
    assert "its ContinuousBatchingManager lacks output_router.output_queue" in str(err.value)
    assert not [t for t in threading.enumerate() if t.name == "inferq-continuous-loop"]
