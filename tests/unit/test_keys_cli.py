"""`inferq keys create` finds the Redis of a running `inferq run` through the URL file the run
writes (INFERQ_HOME/valkey/url); a run killed with SIGKILL leaves that file behind, pointing
at a port nobody listens on. The command says so in one line, with what to do for *keys*."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cli.processes import free_port
from tests.support import ROOT, procs
from tests.support.stack import cli_env


def _keys_create(home: Path, *args: str) -> tuple[int, str, str]:
    done = procs.run(
        [sys.executable, "-m", "cli.main", "keys", "create", "alice", *args],
        cwd=ROOT,
        env=cli_env(INFERQ_HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("recorded", ["redis://127.0.0.1:{port}/0", "not a url"])
def test_a_url_file_left_by_a_killed_run_is_named_with_what_to_do_for_keys(
    tmp_path: Path, recorded: str
) -> None:
    url = recorded.format(port=free_port())  # nothing listens there
    url_file = tmp_path / "home" / "valkey" / "url"
    url_file.parent.mkdir(parents=True)
    url_file.write_text(url + "\n")
    code, out, err = _keys_create(tmp_path / "home")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    line = lines[0]
    assert f"the Redis recorded in {url_file} ({url}," in line and "does not answer" in line, line
    assert "start `inferq run` (API keys are stored in its Redis)" in line, line
    assert "--redis-url URL" in line, line
    # the advice for `inferq run` itself, which meant nothing here
    assert "leave out --redis-url" not in line and "Traceback" not in err


def test_an_unreachable_url_given_keeps_its_own_advice(tmp_path: Path) -> None:
    """A URL the user named is theirs to start: not mistaken for the recorded one."""
    (tmp_path / "home" / "valkey").mkdir(parents=True)
    (tmp_path / "home" / "valkey" / "url").write_text("redis://127.0.0.1:1/0")
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _, err = _keys_create(tmp_path / "home", "--redis-url", url)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"cannot reach {url}" in lines[0], err
    assert "recorded" not in err
