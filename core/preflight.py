"""What can be checked about a model before anything starts.

Why: a model path with a typo used to start every process, and the user waited up to ten
minutes for a READY line that never came while the API answered 500. Each check here names
the path or value to fix; `inferq run` prints them and exits before starting anything.
"""

from __future__ import annotations

import json
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_problems(path: str, model_type: str, template: str, adapters: list[str]) -> list[str]:
    """One line per problem with the model flags (empty: nothing found)."""
    problems = _model_dir(Path(path)) + [p for a in adapters for p in _adapter_dir(Path(a))]
    if model_type or template:
        problems += _swift_names(model_type, template)
    return problems


def adapters_dir_problems(path: Path, engine_mode: str) -> list[str]:
    """A typo in --adapters-dir would otherwise be created empty, and serve nothing."""
    if not path.exists():
        return [f"--adapters-dir {path}: no such directory (create it first; an empty one is fine)"]
    if not path.is_dir():
        return [f"--adapters-dir {path}: not a directory"]
    if engine_mode != "static":
        return [
            f"--adapters-dir serves adapters in the static engine mode only, not --engine-mode {engine_mode}"
        ]
    return []


def _model_dir(path: Path) -> list[str]:
    if not path.exists():
        return [f"--model {path}: no such directory"]
    if not path.is_dir():
        return [f"--model {path}: not a directory (give the model's directory, not a file in it)"]
    config = path / "config.json"
    if not config.is_file():
        return [f"--model {path}: no config.json in it; is this a Hugging Face model directory?"]
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        return [f"--model {path}: config.json is not readable JSON ({exc})"]
    if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in path.iterdir()):
        return [f"--model {path}: no weight files (*.safetensors, *.bin) in it"]
    return []


def _adapter_dir(path: Path) -> list[str]:
    if not path.is_dir():
        return [f"--adapters {path}: no such directory"]
    if not (path / "adapter_config.json").is_file():
        return [f"--adapters {path}: no adapter_config.json in it; is this a PEFT LoRA checkpoint?"]
    return []


def _swift_names(model_type: str, template: str) -> list[str]:
    """ms-swift's registries (importing them takes seconds, so only for a real model)."""
    from swift.model import MODEL_MAPPING
    from swift.template import TEMPLATE_MAPPING

    problems = []
    if model_type and model_type not in MODEL_MAPPING:
        near = _near(model_type, MODEL_MAPPING)
        problems.append(f"--model-type {model_type}: not a model type ms-swift knows{near}")
    if template and template not in TEMPLATE_MAPPING:
        near = _near(template, TEMPLATE_MAPPING)
        problems.append(f"--template {template}: not a template ms-swift knows{near}")
    return problems


def flag_hint(path: str) -> str:
    """What the model's own config.json suggests for --model-type and --template, said with
    the error that they are missing (ms-swift's registry maps architectures to types)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    from swift.model import MODEL_MAPPING

    hf_type, archs = config.get("model_type"), config.get("architectures") or []
    matches = [k for k, v in MODEL_MAPPING.items() if k == hf_type] + [
        k for k, v in MODEL_MAPPING.items() if k != hf_type and set(archs) & set(v.architectures or [])
    ]
    if not matches:
        return ""
    templates = (MODEL_MAPPING[matches[0]].candidate_templates or [])[:3]
    such = f" and a --template such as {', '.join(templates)}" if templates else ""
    return f"; its config.json suggests --model-type {matches[0]}{such}"


def _near(name: str, known: object) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=3)  # type: ignore[call-overload]
    return f" (did you mean {', '.join(close)}?)" if close else ""
