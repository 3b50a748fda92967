"""Every `scripts/run` and `inferq` command line in README's shell blocks parses with the CLI
as it is: the first commands a user copies (a flag renamed or dropped fails here, not for
them). What they do is tested elsewhere; the names they pass to ms-swift are checked in
tests/integration/test_setup_errors.py."""

from __future__ import annotations

import re
import shlex

import pytest

from cli.main import build_parser
from tests.support import ROOT

PROGRAMS = {"scripts/run": ["run"], "inferq": [], ".venv/bin/inferq": []}


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            code = line.split(" #", 1)[0].split("...same", 1)[0]
            code = re.sub(r"\[[^\]]*\]", "", code).strip()  # optional parts
            if not re.search(r"(^|\s)(scripts/run|inferq|\.venv/bin/inferq)(\s|$)", code):
                continue  # curl, JSON, heredocs
            words = shlex.split(code)
            while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
                words.pop(0)
            if words and words[0] in PROGRAMS:
                found.append(" ".join(shlex.quote(w) for w in words))
    inline = re.findall(r"`((?:scripts/run|inferq) [^`]+)`", text)  # `inferq run --adapters-dir DIR`
    found += [re.sub(r"\s*\[[^\]]*\]", "", code) for code in inline]  # optional parts
    return found


def test_readme_has_the_commands_it_should() -> None:
    commands = _commands()
    assert any(c.startswith("scripts/run --model") for c in commands)
    assert any(c.startswith("inferq batch submit") for c in commands)
    assert any(c.startswith("inferq worker") for c in commands)


@pytest.mark.parametrize("command", _commands())
def test_readme_command_parses(command: str) -> None:
    words = shlex.split(command.replace("$Q", "redis://queue-host:6379/0"))
    argv = PROGRAMS[words[0]] + words[1:]
    args = build_parser().parse_args(argv)  # SystemExit(2) on an unknown flag or a bad value
    assert args.cmd
