"""Child processes of a test run die with it, however it ends.

A run stopped by Ctrl-C tears its fixtures down; one killed (`timeout`, SIGKILL, a CI job
cancelled) does not, and the Valkey, Celery and API processes it started would live on,
holding ports, CPU and memory. So every process the tests start runs in a session of its
own (out of reach of a terminal's Ctrl-C, which the test's teardown handles; a Supervisor
stops it as a group, a Celery worker's pool children with it) and with PR_SET_PDEATHSIG
(Linux): the kernel sends it SIGTERM when the test process dies, whatever killed it. A
Celery pool child gets SIGKILL when its worker parent dies (Celery sets that itself), so a
stack goes down from the top. `Supervisor(die_with_parent=True)` and
`cli.processes.dying_with_this_process` are the product's own, as `inferq run` uses them.
tests/integration/test_no_leftovers.py kills a session holding a stack and checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from cli.processes import Supervisor, dying_with_this_process


def supervisor() -> Supervisor:
    """A Supervisor whose children die with this process."""
    return Supervisor(die_with_parent=True)


#: a command line: strings and paths, as subprocess takes them
Argv = Sequence[str | os.PathLike[str]]


def dying_with_us(argv: Argv) -> list[str | os.PathLike[str]]:
    """`argv` run through the product's wrapper that sets the parent-death signal, then execs
    it (same pid, same command line afterwards)."""
    if sys.platform != "linux":
        return list(argv)
    return list(dying_with_this_process([os.fspath(a) for a in argv]))


def popen(argv: Argv, **kwargs: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen` for a child that dies with this process, in a session of its own."""
    return subprocess.Popen(dying_with_us(argv), start_new_session=True, **kwargs)


def run(argv: Argv, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run` for a child that dies with this process, in a session of its own."""
    return subprocess.run(dying_with_us(argv), start_new_session=True, **kwargs)
