"""README's "make a LoRA for the demo model" snippet runs as printed, against a demo model
built where `inferq run` builds it (under a temporary home), and makes an adapter that
changes the model's output: what a user copies works."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from core.config import Settings
from models.demo import build_demo_model
from tests.support import ROOT

MARKER = "# make-lora:"


def _snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(MARKER)]
    assert len(found) == 1, f"README should have one python block starting {MARKER!r}"
    return found[0]


def test_readme_lora_snippet_makes_an_adapter_the_demo_model_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("INFERQ_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    base_dir = build_demo_model(Settings().demo_model_dir)  # where `inferq run` builds it
    assert base_dir == tmp_path / ".cache" / "inferq" / "demo-model"

    exec(compile(_snippet(), "README.md:make-lora", "exec"), {"__name__": "readme"})

    adapter = tmp_path / "adapters" / "my-lora"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (adapter / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, adapter)(ids).logits
    assert not torch.allclose(plain, tuned)  # init_lora_weights=False: it does something
