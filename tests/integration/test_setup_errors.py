"""Set-up mistakes fail fast and say what to fix: a model path that is not there, a template
ms-swift does not know, weights that do not load in the worker; an API without a model
answers 503 with the reason, never 500."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli.processes import api_argv, free_port, port_open
from tests.support import ROOT, procs
from tests.support.stack import cli_env, proc_file, stack_env, with_db
from tests.support.wait import eventually


def _run(
    tmp_path: Path, *args: str, timeout: float, flower: bool = False, env_extra: dict[str, str] | None = None
) -> tuple[int, str, float]:
    env = cli_env(INFERQ_HOME=str(tmp_path / "home"), **(env_extra or {}))
    t0 = time.monotonic()
    no_flower = [] if flower else ["--no-flower"]
    proc = procs.run(
        [sys.executable, "-m", "cli.main", "run", "--port", str(free_port()), *no_flower, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def test_a_model_path_that_is_not_there_fails_at_once_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "Qwen2.5-0.5B-Instruct"
    code, out, took = _run(
        tmp_path, "--model", str(missing), "--model-type", "qwen2", "--template", "qwen2_5", timeout=60
    )
    assert code == 2 and f"--model {missing}: no such directory" in out, out[-2000:]
    assert took < 30
    assert "Traceback" not in out


def test_an_unknown_template_fails_at_once_with_suggestions(tmp_path: Path, demo_model: Path) -> None:
    code, out, _ = _run(
        tmp_path, "--model", str(demo_model), "--model-type", "qwen2", "--template", "qwen2.5", timeout=120
    )
    assert code == 2 and "--template qwen2.5: not a template ms-swift knows (did you mean" in out, out[-2000:]
    assert "qwen2_5" in out


def test_every_problem_is_named_in_one_go_with_a_hint_from_the_config(
    tmp_path: Path, demo_model: Path
) -> None:
    """One round of fixes, not one per run: the missing flags (with what the model's own
    config.json suggests) and a bad adapter path, together."""
    code, out, _ = _run(tmp_path, "--model", str(demo_model), "--adapters", "/nope", timeout=120)
    assert code == 2, out[-2000:]
    assert "--model needs --model-type and --template" in out
    assert "its config.json suggests --model-type qwen2 and a --template such as" in out
    assert "--adapters /nope: no such directory" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--adapters", "/nope"], "--adapters applies to --model, and no --model was given"),
        (["--template", "qwen2_5"], "--template applies to --model, and no --model was given"),
        (["--adapters-dir", "/nope/loras"], "--adapters-dir /nope/loras: no such directory"),
        (
            ["--adapters-dir", ".", "--engine-mode", "continuous"],
            "--adapters-dir serves adapters in the static engine mode only",
        ),
    ],
)
def test_flags_that_would_be_ignored_or_create_a_typo_are_refused(
    tmp_path: Path, args: list[str], line: str
) -> None:
    """With the demo model these used to be dropped silently (the run served no adapter),
    and a mistyped --adapters-dir was created empty."""
    code, out, took = _run(tmp_path, *args, timeout=60)
    assert code == 2 and line in out, out[-2000:]
    assert took < 30 and not (tmp_path / "home" / "run.lock").exists()


BATCH_SIZE = "--max-batch-size / INFERQ_MAX_BATCH_SIZE: Input should be"


@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        ([], {"INFERQ_MAX_BATCH_SIZE": "abc"}, f"{BATCH_SIZE} a valid integer"),
        (["--max-batch-size", "0"], {}, f"{BATCH_SIZE} greater than or equal to 1 (got '0')"),
        ([], {"INFERQ_REDIS_TIMEOUT_S": "soon"}, "INFERQ_REDIS_TIMEOUT_S: Input should be a valid number"),
        (["--redis-url", "localhost:6379"], {}, "--redis-url localhost:6379: Redis URL must specify one of"),
        (["--redis-url", "redis://127.0.0.1:1/0"], {}, "cannot reach redis://127.0.0.1:1/0 ("),
        ([], {"INFERQ_API_KEYS": "my-key"}, 'error parsing value for field "api_keys"'),
        (["--port", "5555", "--flower-port", "5555"], {}, "--port and --flower-port are both 5555"),
        (["--port", "70000"], {}, "argument --port: 70000 is not a port (1-65535)"),
    ],
)
def test_bad_settings_and_an_unreachable_redis_are_one_line_each(
    tmp_path: Path, args: list[str], env: dict[str, str], line: str
) -> None:
    """A bad INFERQ_ value was a pydantic traceback (in each child, for one given as a flag;
    --max-batch-size 0 was dropped silently), a Redis that does not answer a 600 s wait."""
    code, out, took = _run(tmp_path, *args, timeout=60, env_extra=env, flower="--flower-port" in args)
    assert code == 2 and line in out, out[-2000:]
    assert "Traceback" not in out and "started" not in out and took < 30


def test_the_model_flags_readme_shows_are_names_ms_swift_knows() -> None:
    """README's real-model commands are the first a user copies: each --model-type and
    --template (and their INFERQ_ forms) must pass the same check `inferq run` makes."""
    import re

    from cli.preflight import swift_name_problems

    text = (ROOT / "README.md").read_text() + (ROOT / "docker-compose.yml").read_text()
    types = set(re.findall(r"(?:--model-type |INFERQ_MODEL_TYPE=)(\w+)", text))
    templates = set(re.findall(r"(?:--template |INFERQ_TEMPLATE=)(\w+)", text))
    assert types and templates
    for model_type in types:
        assert swift_name_problems(model_type, "") == [], model_type
    for template in templates:
        assert swift_name_problems("", template) == [], template


def test_a_port_in_use_is_named_before_anything_starts(tmp_path: Path) -> None:
    """uvicorn's bind error used to come after Valkey and the worker had started, amid their
    shutdown; now one line per port, and nothing started."""
    import socket

    with socket.socket() as api, socket.socket() as flower:
        for held in (api, flower):
            held.bind(("127.0.0.1", 0))
            held.listen()
        taken, taken_flower = api.getsockname()[1], flower.getsockname()[1]
        code, out, took = _run(
            tmp_path, "--port", str(taken), "--flower-port", str(taken_flower), timeout=60, flower=True
        )
    assert code == 2, out[-2000:]
    assert f"--port {taken}: cannot listen on 127.0.0.1:{taken} (already in use); pick another with" in out
    assert f"--flower-port {taken_flower}: cannot listen on 127.0.0.1:{taken_flower} (already in use)" in out
    assert "started" not in out and took < 30


def test_ctrl_c_while_the_worker_loads_says_nothing_of_a_job(tmp_path: Path) -> None:
    """Celery reports every child a stop signal ends; one still loading its model had no job,
    and "stopped with a job in flight" was said anyway."""
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = procs.popen(
            [sys.executable, "-m", "cli.main", "run", "--port", str(free_port()), "--no-flower"],
            cwd=ROOT,
            env=cli_env(INFERQ_HOME=str(tmp_path / "home")),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def loading() -> bool:  # the Celery parent's child is loading torch
            assert proc.poll() is None, log.read_text()[-2000:]
            return _pool_child_of(proc.pid)

        eventually(loading, timeout=60, message=lambda: log.read_text()[-2000:])
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert code == 0 and "READY" not in text, text[-2000:]  # stopped before it was up
    for wrong in ("job in flight", "Traceback", "WorkerLostError", "exited with"):
        assert wrong not in text, (wrong, text[-2000:])


def _pool_child_of(pid: int) -> bool:
    """Whether `inferq run` (pid) has a pool child under its worker, and it has torch loaded
    (the parent never imports it: the child is loading its engine)."""

    def children(of: int) -> list[int]:
        return [int(c) for c in proc_file(of, f"task/{of}/children").split()]

    for child in children(pid):
        if b"celery" in proc_file(child, "cmdline"):
            return any(b"libtorch" in proc_file(pool, "maps") for pool in children(child))
    return False


def test_weights_that_do_not_load_stop_the_run_with_the_childs_error(
    tmp_path: Path, demo_model: Path
) -> None:
    broken = tmp_path / "broken-model"
    shutil.copytree(demo_model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    code, out, took = _run(
        tmp_path, "--model", str(broken), "--model-type", "qwen2", "--template", "qwen2_5", timeout=280
    )
    assert code == 1 and "a worker child could not load its engine" in out, out[-3000:]
    assert took < 240
    assert "Traceback" not in out and "(--verbose shows the traceback)" in out  # a calm console


def test_a_worker_whose_engine_cannot_load_exits_instead_of_forking_again(
    tmp_path: Path, demo_model: Path, redis_url: str
) -> None:
    """`inferq worker` (docker-compose, systemd): Celery's parent forked a new child after
    every failed load, forever, and looked alive; it now exits 3 with the child's error."""
    broken = tmp_path / "broken-model"
    shutil.copytree(demo_model, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    flags = ["--model", str(broken), "--model-type", "qwen2", "--template", "qwen2_5"]
    t0 = time.monotonic()
    done = procs.run(
        [sys.executable, "-m", "cli.main", "worker", "--redis-url", with_db(redis_url, 8), *flags],
        cwd=ROOT,
        env=cli_env(INFERQ_HOME=str(tmp_path / "home")),
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 3, out[-3000:]
    assert "this worker child could not load its engine" in out and time.monotonic() - t0 < 200
    assert out.count("could not load its engine") <= 2, out[-3000:]  # no loop of loads


def test_an_api_without_a_model_answers_503_with_the_reason(redis_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-model-here"
    env = stack_env(with_db(redis_url, 8), missing, tmp_path)
    port = free_port()
    sup = procs.supervisor()
    try:
        proc = sup.start("api", api_argv("127.0.0.1", port), env=env, cwd=ROOT, stdout=subprocess.DEVNULL)

        def listening() -> bool:
            assert proc.poll() is None, f"the API exited with code {proc.returncode}"
            return port_open(port)

        eventually(listening, timeout=60, interval=0.1, message="the API listening")
        base = f"http://127.0.0.1:{port}"
        for _ in range(2):  # the first load fails, and so does the answer to the next request
            resp = httpx.get(f"{base}/v1/models", timeout=60)
            assert resp.status_code == 503, resp.text
            err = resp.json()["error"]
            assert err["code"] == "model_unavailable" and "could not be loaded" in err["message"]
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        resp = httpx.post(f"{base}/v1/jobs", json=body, timeout=60)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_unavailable"
    finally:
        sup.stop_all()


def test_a_second_run_on_the_same_home_is_refused(tmp_path: Path) -> None:
    import fcntl

    home = tmp_path / "home"
    home.mkdir()
    with (home / "run.lock").open("ab") as held:  # as a first `inferq run` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, took = _run(tmp_path, timeout=60)
    assert code == 2 and f"INFERQ_HOME={home}" in out and "its own home" in out, out[-2000:]
    assert took < 30
    assert not (home / "valkey").exists()  # nothing was started


def test_bootstrap_names_a_python_too_old_or_missing(tmp_path: Path) -> None:
    """The first `scripts/run` on a machine whose python3 is 3.10 (or absent) used to fail
    deep in pip; it says which Python it needs and how to name one."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for python in ("no-such-python", "/usr/bin/false"):
        done = procs.run(
            ["bash", "scripts/bootstrap"],
            cwd=tmp_path,
            env=cli_env(PYTHON=python),
            capture_output=True,
            text=True,
            timeout=60,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert "inferq needs Python 3.11 or newer" in lines[0] and "PYTHON=python3.11" in lines[0]
    assert not (tmp_path / ".venv").exists()
