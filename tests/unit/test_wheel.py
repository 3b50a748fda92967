"""What the wheel installs: the product's packages with their Lua scripts, and nothing else
(no benchmarks, no tests)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_the_product_and_its_scripts_only(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "-w", tmp_path, ROOT],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("inferq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names if "/" in n and not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"api", "cli", "core", "models", "schemas", "tasks", "workers"}
    lua = {Path(n).name for n in names if n.endswith(".lua")}
    assert {"transition.lua", "pop.lua", "tidy.lua", "reap.lua", "observe.lua", "xadd_tokens.lua"} <= lua
    assert "celeryconfig.py" in names
