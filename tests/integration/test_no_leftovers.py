"""A test run killed outright leaves no process behind: a pytest session holding a stack from
the suite's own fixtures (Valkey, a Celery worker with its pool child, the API, Flower) is
sent SIGKILL, so no fixture is torn down, and everything it started goes anyway
(tests/support/procs.py says how)."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

from tests.support import ROOT, procs
from tests.support.stack import proc_file
from tests.support.wait import eventually

INNER = """
import os
import time
from pathlib import Path


def test_hold_a_stack(echo_stack):
    Path(os.environ["LEFTOVER_READY"]).write_text(echo_stack.base_url)
    time.sleep(600)  # time passing is the point: it holds the stack until it is killed
"""


def _marked(mark: str) -> dict[int, str]:
    """pid: command line of each live process with `mark` in its environment (Valkey rewrites
    its title over its environment: it is found as a descendant, below)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and mark.encode() in proc_file(int(entry.name), "environ"):
            found[int(entry.name)] = _cmdline(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    return proc_file(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")


def _stat(pid: int) -> list[bytes]:
    """/proc/<pid>/stat's fields after the command name: state, ppid, ... ([] once it is gone)."""
    stat = proc_file(pid, "stat")
    return stat.rsplit(b")", 1)[1].split() if stat else []


def _descendants(pid: int) -> dict[tuple[int, bytes], str]:
    """(pid, start time): command line of each process below `pid`, now."""
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            for child in proc_file(parent, f"task/{task.name}/children").split():
                stat = _stat(int(child))
                if stat:
                    found[(int(child), stat[19])] = _cmdline(int(child))  # field 22: start time
                    todo.append(int(child))
    return found


def _alive(pid: int, started: bytes) -> bool:
    """The same process (not a later one given its pid), and not a zombie."""
    stat = _stat(pid)
    return bool(stat) and stat[19] == started and stat[0] != b"Z"


def test_a_killed_test_run_leaves_no_process(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    mark = f"inferq-leftover-{uuid.uuid4().hex}"
    ready = tmp_path / "ready"
    # its own Valkey even where this run uses an external Redis (the inner session would flush it)
    env = {k: v for k, v in os.environ.items() if k != "INFERQ_TEST_REDIS_URL"}
    env.update(LEFTOVER_MARK=mark, LEFTOVER_READY=str(ready))
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(tmp_path / "pytest.ini"),
        "--rootdir",
        str(tmp_path),
        "-p",
        "no:cacheprovider",
        "-p",
        "tests.conftest",  # the suite's fixtures, as plugins: the inner test is outside tests/
        "-p",
        "tests.integration.conftest",
        f"--basetemp={tmp_path / 'inner-tmp'}",
        "-q",
        str(tmp_path / "test_inner.py"),
    ]
    log = tmp_path / "inner.log"
    with log.open("wb") as out:
        inner = procs.popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out)
    try:

        def stack_up() -> bool:
            assert inner.poll() is None, log.read_text(errors="replace")[-3000:]
            return ready.exists()

        eventually(
            stack_up, timeout=240, interval=0.2, message=lambda: log.read_text(errors="replace")[-3000:]
        )
        started = _descendants(inner.pid)
        text = "\n".join(started.values())
        for part in ("valkey-server", "tasks.app worker", "api.serve", "tasks.app flower"):
            assert part in text, (part, text)
        # the worker's pool child: a grandchild of the killed session
        workers = [pid for (pid, _), cmd in started.items() if "tasks.app worker" in cmd]
        assert any(int(_stat(pid)[1]) in workers for pid in workers), text
        assert set(_marked(mark)) - {inner.pid} <= {pid for pid, _ in started}
        inner.send_signal(signal.SIGKILL)  # no teardown, no atexit: only the kernel acts
        inner.wait()
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()

    def left() -> dict[int, str]:
        return {pid: cmd for (pid, t), cmd in started.items() if _alive(pid, t)} | _marked(mark)

    eventually(lambda: not left(), timeout=60, interval=0.2, message=lambda: f"alive: {left()}")
