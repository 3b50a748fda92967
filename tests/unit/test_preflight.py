"""The start-up checks against the flags and INFERQ_ settings as the processes will read
them: a flag overrides its own variable, each field alone (cli.main.build_env passes them
on so), and only flags given now are refused for being useless."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from cli import preflight
from cli.main import build_env, build_parser
from core.config import Settings
from tasks import engine_failure


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def _settings(**fields: Any) -> Settings:
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


def test_a_leftover_variable_is_not_refused_with_the_demo_model() -> None:
    assert preflight.model_problems(_args(), _settings(model_type="qwen2", template="qwen2_5")) == []


def test_a_flag_the_demo_model_would_drop_is_refused() -> None:
    problems = preflight.model_problems(_args("--template", "qwen2_5"), _settings())
    assert problems == ["--template applies to --model, and no --model was given (the demo model takes none)"]


def test_the_echo_engine_takes_no_model_and_is_told_nothing_of_one() -> None:
    assert preflight.model_problems(_args("--engine", "echo", "--template", "qwen2_5"), _settings()) == []


def test_the_api_is_not_refused_for_what_only_workers_read(tmp_path: Path) -> None:
    args = _args("--adapters-dir", str(tmp_path / "typo"))
    assert preflight.model_problems(args, _settings(), worker=False) == []
    assert "no such directory" in preflight.model_problems(args, _settings())[0]


def test_flags_and_variables_mix_field_by_field(demo_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--model with INFERQ_MODEL_TYPE/INFERQ_TEMPLATE from the environment: checked as one
    model, and the children get that same one (the flag path, the variables' type and
    template), not empty strings."""
    monkeypatch.setenv("INFERQ_MODEL_TYPE", "qwen2")
    monkeypatch.setenv("INFERQ_TEMPLATE", "qwen2_5")
    args, settings = _args("--model", str(demo_model)), Settings()
    assert preflight.model_problems(args, settings) == []
    env = build_env(args, settings, "redis://127.0.0.1:6379/0")
    assert (env["INFERQ_MODEL_PATH"], env["INFERQ_MODEL_TYPE"], env["INFERQ_TEMPLATE"]) == (
        str(demo_model.resolve()),
        "qwen2",
        "qwen2_5",
    )
    override = build_env(_args("--model", str(demo_model), "--template", "qwen"), settings, "redis://x:1/0")
    assert override["INFERQ_TEMPLATE"] == "qwen" and override["INFERQ_MODEL_TYPE"] == "qwen2"


def test_settings_problems_read_the_environment_given_and_restore_ours() -> None:
    before = dict(os.environ)
    assert preflight.settings_problems({"INFERQ_MAX_BATCH_SIZE": "0"}) == [
        "--max-batch-size / INFERQ_MAX_BATCH_SIZE: Input should be greater than or equal to 1 (got '0')"
    ]
    assert preflight.settings_problems({"INFERQ_MAX_BATCH_SIZE": "4"}) == []
    assert dict(os.environ) == before


def test_a_child_signals_only_the_parent_that_armed_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --pool solo (no parent armed) or orphaned (parent init), nobody is signalled."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(engine_failure, "_PARENT", None)
    engine_failure.tell_parent()
    monkeypatch.setattr(engine_failure, "_PARENT", os.getpid())  # not our parent
    engine_failure.tell_parent()
    assert sent == []
    monkeypatch.setattr(engine_failure, "_PARENT", os.getppid())
    engine_failure.tell_parent()
    assert sent == [(os.getppid(), engine_failure.SIGNAL)]
