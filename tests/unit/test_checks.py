"""The checks a developer's commit runs are CI's: pre-commit's hooks and scripts/test agree."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _ci_checks() -> list[str]:
    """The commands scripts/test runs before pytest."""
    lines = (ROOT / "scripts" / "test").read_text().splitlines()
    start = lines.index(". .venv/bin/activate") + 1
    return [line for line in lines[start:] if not line.startswith("exec ")]


def test_pre_commit_runs_every_check_ci_runs() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    entries = [h["entry"] for repo in config["repos"] for h in repo["hooks"]]
    for check in _ci_checks():
        tool = check.split()[0]
        assert any(e.split()[0] == tool and set(e.split()) <= set(check.split()) for e in entries), check


def test_long_commit_subjects_are_refused(tmp_path: Path) -> None:
    hook = ROOT / "scripts" / "check-commit-msg"
    message = tmp_path / "COMMIT_EDITMSG"
    message.write_text("x" * 73 + "\n\nbody\n")
    refused = subprocess.run([hook, message], capture_output=True, text=True)
    assert refused.returncode == 1 and "73 characters" in refused.stderr
    message.write_text("x" * 72 + "\n\n" + "y" * 200 + "\n")
    assert subprocess.run([hook, message]).returncode == 0
