"""`inferq`: run the whole product on one machine.

`inferq run` starts an embedded Valkey (unless a Redis URL is given), one Celery worker
(prefork, concurrency 1) holding a warm engine, the API under uvicorn, and Flower, and
stops them all on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO

from pydantic import ValidationError
from pydantic_settings import SettingsError

from cli import api_options, preflight
from cli import batch as batch_cli
from cli import top as top_cli
from cli.processes import (
    Supervisor,
    api_argv,
    flower_argv,
    free_port,
    port_open,
    quiet_env,
    valkey_argv,
    wait_for,
    worker_argv,
)
from core import keys
from core.config import Settings, version

logger = logging.getLogger("inferq")

#: a process that exits this many times within CRASH_WINDOW_S is not started again
MAX_RESTARTS = 5
CRASH_WINDOW_S = 300.0


def port_number(text: str) -> int:
    """argparse's type for a TCP port: 70000 was an OverflowError traceback from the bind check."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1-65535)")
    return port


def _model_args(p: argparse.ArgumentParser) -> None:
    """The model flags of `run`, `worker` and `api` (every process must serve the same one)."""
    p.add_argument("--model", help="local model directory (default: build and serve the tiny demo model)")
    p.add_argument("--model-type", default="", help="ms-swift model_type, e.g. qwen2 (required for --model)")
    p.add_argument("--template", default="", help="ms-swift template, e.g. qwen2_5 (required for --model)")
    p.add_argument("--adapters", nargs="*", default=[], help="LoRA adapter directories to merge at load")
    p.add_argument(
        "--adapters-dir",
        default=None,
        help="serve every LoRA adapter in this directory by its name, watched for changes",
    )
    p.add_argument("--served-model-name", default="", help="the `model` id clients send")
    p.add_argument("--engine", choices=["swift", "echo"], default=None)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument(
        "--engine-mode",
        choices=["static", "continuous"],
        default=None,
        help="static batches (default) or transformers' continuous batching",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every process's INFO log (Celery, uvicorn, Flower, ms-swift); default: warnings only",
    )


def _run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="start Valkey (embedded), worker, API and Flower")
    _model_args(p)
    p.add_argument("--redis-url", default=None, help="use this Redis/Valkey instead of the embedded one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--flower-port", type=port_number, default=5555)
    p.add_argument("--no-flower", action="store_true")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow binding off loopback without API keys / Flower auth (not recommended)",
    )


def build_env(args: argparse.Namespace, settings: Settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["INFERQ_REDIS_URL"] = redis_url
    # the console shows warnings only: one line per finished job goes to a file instead
    env.setdefault("INFERQ_AUDIT_LOG", str(settings.home / "audit.log"))
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # never initialise CUDA just to ask if it exists
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.engine:
        env["INFERQ_ENGINE"] = args.engine
    # each flag overrides its own INFERQ_ variable, as cli.preflight checks them
    if args.model:
        env["INFERQ_MODEL_PATH"] = str(Path(args.model).resolve())
    if args.model_type:
        env["INFERQ_MODEL_TYPE"] = args.model_type
    if args.template:
        env["INFERQ_TEMPLATE"] = args.template
    if args.adapters:
        env["INFERQ_ADAPTERS"] = json.dumps([str(Path(a).resolve()) for a in args.adapters])
    if args.served_model_name:
        env["INFERQ_SERVED_MODEL_NAME"] = args.served_model_name
    if args.adapters_dir:
        env["INFERQ_ADAPTERS_DIR"] = str(Path(args.adapters_dir).resolve())
    if args.max_batch_size is not None:
        env["INFERQ_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.engine_mode:
        env["INFERQ_ENGINE_MODE"] = args.engine_mode
    return env


def _flower_env(env: dict[str, str], host: str, basic_auth: str) -> dict[str, str]:
    if basic_auth:
        return {**env, "FLOWER_BASIC_AUTH": basic_auth}
    # Flower's JSON API is off without auth; on loopback only this machine can reach it.
    if host in preflight.LOOPBACK:
        return {**env, "FLOWER_UNAUTHENTICATED_API": "true"}
    return env


def _demo_if_no_model(args: argparse.Namespace, settings: Settings) -> None:
    if not args.model and not settings.model_path and (args.engine or settings.engine) == "swift":
        from models.demo import build_demo_model

        build_demo_model(settings.demo_model_dir)
        logger.warning(
            "No --model given: serving the DEMO model (random weights, GIBBERISH output) from %s. "
            "Its template (qwen2_5) adds Qwen's default system prompt ('You are Qwen, created by "
            "Alibaba Cloud...') to a conversation that has none, as it would for a real Qwen2.5.",
            settings.demo_model_dir,
        )


def _refused(problems: list[str]) -> int | None:
    """Each problem on a line of its own, and exit code 2; None when there are none."""
    for problem in problems:
        logger.error("%s", problem)
    return 2 if problems else None


def cmd_run(args: argparse.Namespace) -> int:
    settings = Settings()
    with_flower = not args.no_flower
    given_url = args.redis_url or settings.redis_url
    problems = preflight.redis_problems(given_url, must_answer=True) if given_url else []
    problems += preflight.host_problems(args, settings, with_flower) + preflight.model_problems(
        args, settings
    )
    if (code := _refused(problems)) is not None:
        return code
    lock = _lock_home(settings.home)
    if lock is None:
        logger.error(
            "Another `inferq run` is using INFERQ_HOME=%s (its embedded Valkey's AOF, its files): "
            "two cannot share one. Stop that one, or give this one its own home, e.g. "
            "INFERQ_HOME=%s-2 inferq run ...",
            settings.home,
            settings.home,
        )
        return 2
    problems = preflight.settings_problems(build_env(args, settings, "redis://127.0.0.1:6379/0"))
    if (code := _refused(problems + preflight.port_problems(args, with_flower))) is not None:
        return code
    _demo_if_no_model(args, settings)
    sup = Supervisor(die_with_parent=True)
    stopping = False
    quiet = not args.verbose

    def _on_signal(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        redis_url = args.redis_url or settings.redis_url or _start_valkey(sup, settings, quiet)
        env = build_env(args, settings, redis_url)
        if quiet:
            env = quiet_env(env)
        since = time.time()
        # SIGKILL if `inferq run` is killed (Celery then kills its pool child): a warm or cold
        # shutdown waits for the running task, or for a child still warming its engine (10 s
        # and more), though the supervisor, and the embedded Valkey with it, is gone. The
        # worker's jobs are recovered as after any kill -9 of a worker (docs/reliability.md).
        worker = worker_argv(preflight.child_lanes(env), quiet=quiet)
        sup.start("worker", worker, env=env, death_signal=signal.SIGKILL)
        sup.start("api", api_argv(args.host, args.port, quiet=quiet), env=env)
        base = f"http://{args.host}:{args.port}"
        _wait_ready(base, redis_url, since, sup, lambda: stopping)
        if not args.no_flower and not stopping:
            # after the worker is up: Flower asks the workers about themselves once at start,
            # and warns "Inspect method ... failed" for each question nobody could answer yet
            flower = sup.start(
                "flower",
                flower_argv(args.host, args.flower_port, quiet=quiet),
                env=_flower_env(env, args.host, settings.flower_basic_auth),
            )
            wait_for(lambda: port_open(args.flower_port, _probe_host(args.host)), 30, "flower", flower)
        if not stopping:
            _print_ready(base, None if args.no_flower else f"http://{args.host}:{args.flower_port}")
        return _keep_up(sup, lambda: stopping)
    except (RuntimeError, TimeoutError) as exc:
        logger.error("%s", exc)
        return 1
    finally:
        sup.stop_all()
        _embedded_url_file(settings).unlink(missing_ok=True)
        logger.info("stopped")


def _start_valkey(sup: Supervisor, settings: Settings, quiet: bool) -> str:
    """The embedded Valkey on a free port, its AOF in the home: its URL once it listens."""
    port = free_port()
    valkey = sup.start("valkey", valkey_argv(port, settings.home / "valkey", quiet=quiet))
    wait_for(lambda: port_open(port), 15, "valkey", valkey)
    redis_url = f"redis://127.0.0.1:{port}/0"
    logger.info("embedded Valkey on %s (AOF in %s)", redis_url, settings.home / "valkey")
    _embedded_url_file(settings).write_text(redis_url)  # for `inferq keys create`
    return redis_url


def _keep_up(sup: Supervisor, stopping: Callable[[], bool]) -> int:
    """Starts again a process that exits, after 1 s, 2, 4 ... 30: 0 once asked to stop, 1 when
    one exits MAX_RESTARTS times within CRASH_WINDOW_S (then everything stops)."""
    crashes: dict[str, list[float]] = {}
    while not stopping():
        for name, code in sup.exited():
            now = time.monotonic()
            recent = [t for t in crashes.get(name, []) if now - t < CRASH_WINDOW_S]
            if len(recent) >= MAX_RESTARTS:
                logger.error(
                    "%s exited (code %s) %d times in %.0f s: it cannot stay up; stopping everything. "
                    "Its own log lines above say why.",
                    name,
                    code,
                    len(recent) + 1,
                    CRASH_WINDOW_S,
                )
                return 1
            delay = min(30.0, 2.0 ** len(recent))
            logger.error("%s exited (code %s); starting it again in %.0f s", name, code, delay)
            end = time.monotonic() + delay
            while not stopping() and time.monotonic() < end:
                time.sleep(0.1)
            if stopping():
                break
            sup.restart(name)
            crashes[name] = [*recent, now]
        time.sleep(0.5)
    return 0


def _embedded_url_file(settings: Settings) -> Path:
    """Where a running `inferq run` says its embedded Valkey's URL (a new port each start).
    Kept beside the AOF, under the home's lock; a SIGKILLed run leaves a stale one."""
    return settings.home / "valkey" / "url"


def _probe_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _print_ready(api: str, flower: str | None) -> None:
    """The line a user waits for: last, and set apart from the log above it."""
    rule = "=" * 72
    lines = [f"READY  API {api}   docs {api}/docs"]
    if flower:
        lines.append(f"       Flower {flower}")
    lines.append("       Ctrl-C stops everything.")
    bold = sys.stderr.isatty()
    text = "\n".join(lines)
    if bold:
        text = f"\033[1;32m{text}\033[0m"
    sys.stderr.write(f"{rule}\n{text}\n{rule}\n")
    sys.stderr.flush()


def _lock_home(home: Path) -> IO[bytes] | None:
    """An exclusive lock on the home for this process's life (None: another run holds it).
    flock, so a run killed with SIGKILL leaves no stale lock behind."""
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    fh = (home / "run.lock").open("ab")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


def _wait_ready(
    base: str, redis_url: str, started: float, sup: Supervisor, stopping: Callable[[], bool]
) -> None:
    """The API answers /health and a worker child started by this run has announced a loaded
    engine. (Not /ready: with API keys it needs a key, which the supervisor may not have; and
    a heartbeat of the worker that a kill -9 of the last run left in the AOF stands for
    liveness_s after it died.)"""
    from core import redis_conn

    client = redis_conn.sync_client(redis_url, socket_timeout=2)

    def ready() -> bool:
        # the child's reason first: it also stops its parent, which may have exited already
        for name in client.scan_iter(match=keys.WORKER_FAILURE_PATTERN, count=100):
            raw = client.get(name)
            info = json.loads(raw) if raw else {}
            if info.get("at", 0) >= started:
                raise RuntimeError(f"a worker child could not load its engine: {info.get('error')}")
        if sup.exited():
            name, code = sup.exited()[0]
            raise RuntimeError(f"{name} exited with code {code} during start-up")
        if stopping():
            return True
        with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
            if resp.status != 200:
                return False
        beats = [client.get(name) for name in client.scan_iter(match=keys.WORKER_PATTERN, count=100)]
        return any(json.loads(beat).get("started_at", 0) >= started for beat in beats if beat)

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except RuntimeError:
            raise
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError("the stack did not become ready within 600s")


def _serve_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, what in (("worker", "a GPU worker"), ("api", "the API")):
        p = sub.add_parser(name, help=f"start just {what} against an existing Redis/Valkey (more hosts)")
        _model_args(p)
        p.add_argument("--redis-url", default=None, help="the Redis/Valkey every process of the stack uses")
        if name == "api":
            p.add_argument("--host", default="127.0.0.1")
            p.add_argument("--port", type=port_number, default=8000)
            p.add_argument(
                "--insecure", action="store_true", help="allow binding off loopback without API keys"
            )


def cmd_serve(args: argparse.Namespace) -> int:
    """`inferq worker` / `inferq api`: one process of the stack, in the foreground (it becomes
    that process: Ctrl-C and service managers talk to Celery or uvicorn directly)."""
    settings = Settings()
    redis_url = args.redis_url or settings.redis_url
    if not redis_url:
        logger.error(
            "inferq %s needs --redis-url (or INFERQ_REDIS_URL): the Redis/Valkey that the API and "
            "the workers share, e.g. redis://gpu-host-1:6379/0",
            args.cmd,
        )
        return 2
    problems = preflight.redis_problems(redis_url, must_answer=False)
    problems += preflight.model_problems(args, settings, worker=args.cmd == "worker")
    problems += preflight.settings_problems(build_env(args, settings, redis_url))
    if args.cmd == "api":
        problems += preflight.host_problems(args, settings, False) + preflight.port_problems(args, False)
    if (code := _refused(problems)) is not None:
        return code
    _demo_if_no_model(args, settings)
    env = build_env(args, settings, redis_url)
    quiet = not args.verbose
    if quiet:
        env = quiet_env(env)
    if args.cmd == "worker":
        argv = worker_argv(preflight.child_lanes(env), quiet=quiet)
    else:
        argv = api_argv(args.host, args.port, quiet=quiet)
    if reason := preflight.redis_unreachable(redis_url):
        logger.warning(
            "cannot reach %s now (%s): %s starts anyway and waits for it; check the URL if it stays so",
            redis_url,
            reason,
            args.cmd,
        )
    logger.info("starting %s against %s", args.cmd, redis_url)
    os.execvpe(argv[0], argv, env)


def cmd_keys(args: argparse.Namespace) -> int:
    from core import redis_conn
    from core.auth import create_key

    settings = Settings()
    embedded = _embedded_url_file(settings)
    given = args.redis_url or settings.redis_url
    url = given or (embedded.read_text().strip() if embedded.is_file() else "")
    if not url:
        logger.error(
            "name the server with --redis-url or INFERQ_REDIS_URL (or start `inferq run`: its embedded "
            "Valkey, in INFERQ_HOME=%s, is found by itself)",
            settings.home,
        )
        return 2
    problems = (
        preflight.redis_problems(url, must_answer=True) if given else _recorded_redis_problems(url, embedded)
    )
    if (code := _refused(problems)) is not None:
        return code
    raw, owner = create_key(redis_conn.sync_client(url), args.name, settings.key_ttl_s)
    sys.stdout.write(f"{raw}\n")
    logger.info(
        "created key %s for %r (shown once; only its hash is stored). Serve with INFERQ_REQUIRE_AUTH=true.",
        owner,
        args.name,
    )
    return 0


def _recorded_redis_problems(url: str, path: Path) -> list[str]:
    """The URL `inferq run` recorded for its embedded Valkey does not answer: a killed run left
    it behind. Said for `keys`: the advice for `inferq run` (leave out --redis-url) is no help."""
    try:
        reason = preflight.redis_unreachable(url)
    except ValueError as exc:  # not a URL at all
        reason = str(exc)
    if reason is None:
        return []
    return [
        f"the Redis recorded in {path} ({url}, by an `inferq run` that is no longer running?) does not "
        f"answer ({reason}): start `inferq run` (API keys are stored in its Redis) and run this again, "
        "or pass --redis-url URL"
    ]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", None) is False:
        # `run`, `worker`, `api`: warnings and errors only, as each process they start; the
        # supervisor's own notes (started valkey, stopping flower) come back with --verbose
        logging.getLogger().setLevel(logging.WARNING)
    api_options.apply(parser, args)
    try:
        return _dispatch(parser, args)
    except ValidationError as exc:  # a bad INFERQ_ variable, read by Settings()
        return _refused(preflight.settings_error_lines(exc)) or 2
    except SettingsError as exc:  # one that is not the JSON its list or dict needs
        return _refused([preflight.settings_parse_line(exc)]) or 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferq", description=__doc__)
    parser.add_argument("--version", action="version", version=f"inferq {version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    _serve_parsers(sub)
    batch_cli.add_parser(sub)
    top_cli.add_parsers(sub)
    kp = sub.add_parser("keys", help="manage API keys")
    kp.add_argument("action", choices=["create"])
    kp.add_argument("name", help="who the key is for")
    kp.add_argument("--redis-url", default=None)
    bench = sub.add_parser("bench", help="run the benchmark suite (bench/), or render its report")
    bench.add_argument("which", nargs="?", default="all")
    bench.add_argument("options", nargs=argparse.REMAINDER, help="see `inferq bench all --help`")
    api_options.hoist(parser, sub)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmarks are not part of the installed product (the wheel has no `bench`): they
    run from a source checkout, in a process of their own."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "suite.py").exists():
        sys.stderr.write("inferq: bench runs from a source checkout of inferq (bench/ is not installed)\n")
        return 2
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.call([sys.executable, "-m", "bench", args.which, *args.options], cwd=root, env=env)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.cmd == "keys":
        return cmd_keys(args)
    if args.cmd == "bench":
        return cmd_bench(args)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd in ("worker", "api"):
        return cmd_serve(args)
    if args.cmd == "batch":
        return batch_cli.run(args)
    if args.cmd in ("status", "top"):
        return top_cli.run(args)
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
