"""The directory is the truth for INFERQ_ADAPTERS_DIR: an on-demand unload hides the adapter
of that name only while its directory entry stays as the worker first saw it (no engine:
`workers.adapters.wanted` and `Unloads` on files)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from workers.adapters import Unloads, is_unload, wanted


def _adapter(root: Path, name: str, weights: bytes = b"w") -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def _unload(at: float) -> str:
    return json.dumps({"unloaded": True, "at": at})


def test_an_unload_hides_a_directory_adapter_until_its_files_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "adapters"
    path = _adapter(root, "kappa")
    _adapter(root, "other")
    unloads = Unloads()
    overrides = {"kappa": _unload(1.0)}
    with caplog.at_level(logging.INFO, logger="workers.adapters"):
        plan = wanted(root, overrides, unloads)
        assert sorted(plan.serve) == ["other"] and plan.ended == {}
        # said once, as a warning: the directory holds an adapter that is not served
        hidden = [r for r in caplog.records if "hidden by an on-demand unload" in r.getMessage()]
        assert [r.levelno for r in hidden] == [logging.WARNING]
        assert sorted(wanted(root, overrides, unloads).serve) == ["other"]
        assert len([r for r in caplog.records if "hidden by" in r.getMessage()]) == 1

        (path / "adapter_model.safetensors").write_bytes(b"new weights")  # a new checkpoint
        plan = wanted(root, overrides, unloads)
    assert sorted(plan.serve) == ["kappa", "other"]
    assert plan.ended == {"kappa": overrides["kappa"]}  # for the worker to delete
    ends = [r for r in caplog.records if "its on-demand unload ends" in r.getMessage()]
    assert [r.levelno for r in ends] == [logging.INFO]

    # the next unload (a new entry) hides it again, against the files as they are now
    overrides = {"kappa": _unload(2.0)}
    assert sorted(wanted(root, overrides, unloads).serve) == ["other"]
    os.utime(path / "adapter_model.safetensors", ns=(1, 1))  # touched: a change too
    assert "kappa" in wanted(root, overrides, unloads).serve


def test_an_unload_of_an_absent_name_ends_when_an_adapter_appears(tmp_path: Path) -> None:
    """The issue's case: `my-lora` loaded on demand, then unloaded; later an adapter of that
    name is copied into the directory: it is served."""
    root = tmp_path / "adapters"
    root.mkdir()
    unloads = Unloads()
    overrides = {"my-lora": _unload(1.0)}
    assert wanted(root, overrides, unloads).serve == {}
    assert wanted(root, overrides, unloads).serve == {}
    half = root / "my-lora"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")  # half-copied: no weights yet, not an adapter
    assert wanted(root, overrides, unloads).serve == {}
    _adapter(root, "my-lora")
    plan = wanted(root, overrides, unloads)
    assert list(plan.serve) == ["my-lora"] and list(plan.ended) == ["my-lora"]


def test_on_demand_loads_and_unknown_entries(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    elsewhere = _adapter(tmp_path / "elsewhere", "src")
    overrides = {
        "gamma": json.dumps({"path": str(elsewhere)}),
        "delta": json.dumps({"path": str(tmp_path / "nothing")}),
        "junk": "not json",
    }
    plan = wanted(root, overrides, Unloads())
    assert list(plan.serve) == ["gamma"] and list(plan.problems) == ["delta"] and plan.ended == {}
    assert is_unload(_unload(1.0))
    assert not is_unload(overrides["gamma"]) and not is_unload("not json") and not is_unload("[1]")
