"""Build .whl/ for bench/gpu-run.sh: cp312 wheels of every package inferq needs at run time
that the lent GPU machine's image lacks (it has no package index; its own torch,
transformers and tokenizers are used).

Why a script: done by hand it took a GPU session a quarter of an hour to get the set right.
The set is inferq's run-time requirements (and the bench extra's), walked recursively in
this environment, minus what the image holds (IMAGE, from the device notes: 'cuda' image,
Python 3.12). Run it from the repository root, with the project installed in .venv:

    .venv/bin/python -m bench.gpu_wheels            # then: bash bench/gpu-run.sh ...

A few packages ship sources only; they are built with a Python 3.12 (`PY312=/path/to/python3.12`
where `python3.12` is not one, e.g. a pyenv shim without a 3.12 selected).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

#: Python packages of the GPU machines' 'cuda' image (names normalized), as last listed.
_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
    setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
    triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
    wrapt xarray xxhash yarl zipp"""
IMAGE = set(_IMAGE.split())
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in (17, 24, 27, 28, 31, 34)] + [
    "manylinux2014_x86_64",
    "linux_x86_64",
]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """name -> installed version of `root` and everything it requires here, recursively."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement not installed here: not needed either
        key = norm(dist.metadata["Name"])
        if key in found and not wanted:
            continue
        found[key] = dist.version
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            m = re.match(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?", spec)
            if not m:
                continue
            extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", marker)
            if extra and extra.group(1) not in wanted:
                continue
            if marker and not extra and not _marker_holds(marker):
                continue
            sub = {e.strip() for e in (m.group(2) or "[]")[1:-1].split(",") if e.strip()}
            if norm(m.group(1)) not in found or sub:
                todo.append((m.group(1), sub))
    return found


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate({"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""})


def main() -> int:
    out = Path(".whl")
    out.mkdir(exist_ok=True)
    needed = {k: v for k, v in closure("inferq", {"bench"}).items() if k not in IMAGE and k != "inferq"}
    print(f"{len(needed)} packages to carry: {' '.join(sorted(needed))}")
    failed = []
    for name, version in sorted(needed.items()):
        pin = f"{name}=={version}"
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out), pin]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            continue
        py312 = os.environ.get("PY312") or shutil.which("python3.12")  # source only: build it
        build = [py312 or "python3.12", "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), pin]
        if py312 is None or subprocess.run(build, capture_output=True).returncode != 0:
            failed.append(pin)
    print(
        f"{len(list(out.glob('*.whl')))} wheels in {out}/"
        + (f"; FAILED: {' '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
