"""What can be checked before anything starts: the model flags, the host, the ports.

Why: a model path with a typo used to start every process, and the user waited up to ten
minutes for a READY line that never came while the API answered 500. Each check here names
the path or value to fix, every problem at once (one round of fixes); `inferq run`,
`inferq worker` and `inferq api` print them and exit 2 before starting anything.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from cli.processes import bind_error
from core.config import Settings

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


#: Settings that a command-line flag sets (cli.main.build_env), to name the flag too
FLAGS = {"max_batch_size": "--max-batch-size", "engine_mode": "--engine-mode", "engine": "--engine"}


def settings_error_lines(exc: ValidationError) -> list[str]:
    """A bad INFERQ_ value as one line naming the variable (and its flag), not pydantic's
    traceback."""
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        name = field if field.isupper() else f"INFERQ_{field.upper()}"
        where = f"{FLAGS[field]} / {name}" if field in FLAGS else name
        lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return lines


@contextmanager
def environ_as(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment is exactly `env` for the block, then what it was."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def child_lanes(env: Mapping[str, str]) -> list[str]:
    """The lanes a worker started with `env` consumes: its model's (core.lanes), named as its
    own settings name it once the flags are INFERQ_* variables (`--served-model-name`,
    `--model`), not as this process's settings do."""
    with environ_as(env):
        return Settings().queues


def settings_problems(env: Mapping[str, str]) -> list[str]:
    """The settings every process started with `env` will read, checked once here: a bad
    value (an INFERQ_ variable, or a flag passed on as one) was a traceback in each child."""
    with environ_as(env):
        try:
            Settings()
        except ValidationError as exc:
            return settings_error_lines(exc)
        except SettingsError as exc:
            return [settings_parse_line(exc)]
    return []


def settings_parse_line(exc: SettingsError) -> str:
    """A list or dict variable that is not the JSON pydantic-settings reads it as."""
    return f"{exc} (a list or dict setting is JSON, e.g. INFERQ_API_KEYS='[\"my-key\"]')"


def model_problems(args: argparse.Namespace, settings: Settings, *, worker: bool = True) -> list[str]:
    """The model flags, each over its INFERQ_ variable (as cli.main.build_env passes them on);
    flags the demo model would drop. `worker`: also what only workers read (adapters)."""
    model = args.model or settings.model_path
    model_type = args.model_type or settings.model_type
    template = args.template or settings.template
    adapters = (args.adapters or list(settings.adapters)) if worker else []
    adapters_dir = (args.adapters_dir or settings.adapters_dir) if worker else None
    swift = (args.engine or settings.engine) == "swift"
    problems: list[str] = []
    if not model and swift:  # only flags given here: a leftover variable is not the user's doing now
        given = [
            f
            for f, v in (
                ("--model-type", args.model_type),
                ("--template", args.template),
                ("--adapters", args.adapters),
            )
            if v
        ]
        problems += [
            f"{flag} applies to --model, and no --model was given (the demo model takes none)"
            for flag in given
        ]
    elif model and swift:
        if not model_type or not template:
            problems.append(
                "--model needs --model-type and --template (ms-swift will not guess them for a local dir)"
                + flag_hint(str(model))
            )
        problems += model_dir_problems(str(model), model_type, template, adapters)
    if adapters_dir:
        problems += adapters_dir_problems(Path(adapters_dir), args.engine_mode or settings.engine_mode)
    return problems


def redis_problems(url: str, *, must_answer: bool) -> list[str]:
    """A URL redis-py cannot parse fails every process the same way: said once. `inferq run`
    also needs the server now (it waited 600 s for a READY that could not come); `inferq
    worker`/`api` may be started before it, and only warn (cli.main). A `sentinel://` URL
    (Celery's syntax, core.redis_conn) is checked by asking its sentinels for the primary."""
    from redis.connection import parse_url

    from core import redis_conn

    try:
        redis_conn.parse_sentinel_url(url) if redis_conn.is_sentinel(url) else parse_url(url)
    except ValueError as exc:
        return [f"--redis-url {url}: {exc}"]
    if must_answer and (reason := redis_unreachable(url)):
        return [
            f"cannot reach {url} ({reason}): start it, or leave out --redis-url (and REDIS_URL) "
            "for the embedded Valkey"
        ]
    return []


def redis_unreachable(url: str) -> str | None:
    """Why Redis does not answer a PING within 2 s, or None. Through sentinels: the primary
    they name answers (none named: the sentinels do not know the master name, or it is down)."""
    import redis
    from redis.sentinel import MasterNotFoundError

    from core import redis_conn

    try:
        redis_conn.sync_client(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except MasterNotFoundError as exc:
        hint = "no sentinel answered, or none knows a primary of that name (INFERQ_REDIS_SENTINEL_MASTER)"
        return f"{exc}; {hint}"
    except (redis.RedisError, OSError) as exc:
        return str(exc) or type(exc).__name__
    return None


def port_problems(args: argparse.Namespace, flower: bool) -> list[str]:
    """A port in use (another `inferq run`, a notebook on 8000), said before anything starts:
    uvicorn's bind error came after the worker had started loading, amid its shutdown."""
    wanted = [("--port", args.port)] + ([("--flower-port", args.flower_port)] if flower else [])
    if flower and args.port == args.flower_port:
        return [f"--port and --flower-port are both {args.port}: give each its own"]
    problems = []
    for flag, port in wanted:
        if (why := bind_error(args.host, port)) is not None:
            problems.append(
                f"{flag} {port}: cannot listen on {args.host}:{port} ({why}); pick another with {flag} N"
            )
    return problems


def host_problems(args: argparse.Namespace, settings: Settings, flower: bool) -> list[str]:
    """Off loopback, the API needs keys (and Flower basic auth) unless told --insecure."""
    if args.host in LOOPBACK or args.insecure:
        return []
    if not settings.auth_enabled:
        return [
            f"Refusing to serve on {args.host} without API keys: anyone who can reach it could use your "
            "GPUs. Set INFERQ_API_KEYS (or create keys with `inferq keys create` and set "
            "INFERQ_REQUIRE_AUTH=true), or pass --insecure."
        ]
    if flower and not settings.flower_basic_auth:
        return [
            f"Refusing to expose Flower on {args.host} without INFERQ_FLOWER_BASIC_AUTH=user:password "
            "(or pass --no-flower / --insecure)."
        ]
    return []


def model_dir_problems(path: str, model_type: str, template: str, adapters: list[str]) -> list[str]:
    """One line per problem with a local model and its flags (empty: nothing found)."""
    problems = _model_dir(Path(path)) + [p for a in adapters for p in _adapter_dir(Path(a))]
    if model_type or template:
        problems += swift_name_problems(model_type, template)
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


def swift_name_problems(model_type: str, template: str) -> list[str]:
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
    if not isinstance(config, dict):
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
