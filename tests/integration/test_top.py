"""`inferq top` and `inferq status` against a real stack: `top` says how to quit and quits on
`q` (driven in a pseudo-terminal, as a user's terminal drives it); tokens/s moves while one
long job runs, not only when it ends; a job's timestamps are whole seconds."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from typing import Any

import httpx

from tests.support import ROOT
from tests.support.stack import Stack, blockers, cli_env
from tests.support.wait import eventually


class Pty:
    """A child process on a pseudo-terminal, and everything it wrote to it."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = os.openpty()
        env = cli_env(TERM="xterm", COLUMNS="100", LINES="40")
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT)
        os.close(slave)
        self.master = master
        self.screen = bytearray()

    def read(self) -> str:
        """What it wrote so far (what has come is taken without waiting)."""
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed its side (it exited)
                break
            if not chunk:
                break
            self.screen += chunk
        return self.screen.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)


def test_top_says_how_to_quit_and_quits_on_q(stack: Stack) -> None:
    argv = [sys.executable, "-m", "cli.main", "top", "--url", stack.base_url, "--interval", "0.5"]
    term = Pty(argv)
    try:
        eventually(
            lambda: "q: quit" in term.read() and "workers" in term.read(),
            timeout=60,
            message=lambda: f"top's screen: {term.read()[-1500:]!r}",
        )
        assert term.proc.poll() is None
        os.write(term.master, b"q")
        eventually(
            lambda: term.proc.poll() is not None,
            timeout=5,
            message=lambda: f"top still running after q; screen: {term.read()[-800:]!r}",
        )
        assert term.proc.returncode == 0, term.read()[-1500:]
    finally:
        term.close()


def _workers(c: httpx.Client) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = c.get("/status").json()["workers"]
    return data


def test_tokens_per_second_move_while_one_long_job_runs(stack: Stack) -> None:
    # the demo model never says EOS here (tests/conftest.py): the job runs to max_tokens
    job = stack.submit("a long one", max_tokens=1800, temperature=0.9)
    blockers.append((stack, job))
    stack.wait_running(job)
    with stack.client() as c:

        def rate_while_running() -> float | None:
            rate = max((w.get("tokens_per_s") or 0.0) for w in _workers(c))
            status = c.get(f"/v1/jobs/{job}").json()["status"]
            assert status == "running", f"the job ended ({status}) before tokens/s moved"
            return rate or None

        assert eventually(rate_while_running, timeout=30, message="tokens/s above 0") > 0
        shown = c.get(f"/v1/jobs/{job}").json()
    assert type(shown["created_at"]) is int and type(shown["started_at"]) is int, shown


def test_status_shows_estimates_and_says_so(stack: Stack) -> None:
    stack.wait_job(stack.submit("hello there", max_tokens=4))
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "status", "--url", stack.base_url],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(COLUMNS="100"),
        cwd=ROOT,
        check=True,
    ).stdout
    assert "~ estimated from histogram buckets" in out, out
    assert "~" in out.split("workers")[0], out  # the lanes' percentiles are marked as estimates
    assert "q: quit" not in out
