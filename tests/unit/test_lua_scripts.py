"""Every Lua script names, in its header, each KEYS and ARGV entry its body uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

LUA = Path(__file__).resolve().parents[2] / "core" / "lua"
SCRIPTS = sorted(p for p in LUA.glob("*.lua") if p.stem != "observe")  # observe: a function


def _split(path: Path) -> tuple[str, str]:
    lines = path.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    return "\n".join(lines[:n]), "\n".join(lines[n:])


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_header_names_every_key_and_argument(path: Path) -> None:
    header, body = _split(path)
    assert "KEYS[" in header and "ARGV[" in header, f"{path.name} has no KEYS/ARGV header"
    for kind in ("KEYS", "ARGV"):
        for index in set(re.findall(rf"\b{kind}\[(\d+)\]", body)):
            named = re.search(rf"{kind}\[(?:{index}\]|[\d.]*\s*\.\.\s*[\w#+\- ]*\]|{index}\s*\.\.)", header)
            assert named, f"{path.name}: {kind}[{index}] is used but not named in the header"


def test_every_script_is_there() -> None:
    assert {p.stem for p in SCRIPTS} == {
        "pop",
        "tidy",
        "reap",
        "transition",
        "xadd_tokens",
        "webhook_claim",
        "idempotency_settle",
    }
