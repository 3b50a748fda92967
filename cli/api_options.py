"""`--url` and `--api-key` before or after the subcommand, for every command that talks to the API.

argparse parses a subcommand's options into a namespace of its own and then copies all of it
over the top-level one, defaults included: a subcommand's `--url` default would overwrite the
`--url` given before the subcommand. So each copy defaults to SUPPRESS (absent unless given),
and the default that subcommand declared is filled in after parsing, when nothing was given.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

#: dest -> flag, for the options any API command may take in either position
OPTIONS = {"url": "--url", "api_key": "--api-key"}
_FALLBACKS = "_api_option_defaults"


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """Every action of parser and of its subcommands, at any depth (`batch status`)."""
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _actions(child)


def hoist(parser: argparse.ArgumentParser, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Give `parser` the options of OPTIONS that some subcommand takes; call it once every
    subcommand is added. Each subcommand keeps its own copy (after the subcommand) and its
    default (env INFERQ_URL ...), which `apply` fills in."""
    fallbacks: dict[str, dict[str, Any]] = {}
    for name, child in sub.choices.items():
        taken: dict[str, Any] = {}
        for action in _actions(child):
            if action.dest in OPTIONS and action.option_strings:
                if action.default is not argparse.SUPPRESS:
                    taken.setdefault(action.dest, action.default)
                else:
                    taken.setdefault(action.dest, None)
                action.default = argparse.SUPPRESS
        if taken:
            fallbacks[name] = taken
    parser.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="inferq API base URL, for batch, status and top (env INFERQ_URL); also after the subcommand",
    )
    parser.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="API key, for batch (env INFERQ_API_KEY); also after the subcommand",
    )
    parser.set_defaults(**{_FALLBACKS: fallbacks})


def apply(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The subcommand's default for each option not given; a usage error (exit 2) for one
    given to a subcommand that does not use it (`inferq --url U run` would otherwise ignore it)."""
    fallbacks: dict[str, dict[str, Any]] = getattr(args, _FALLBACKS, {})
    if hasattr(args, _FALLBACKS):
        delattr(args, _FALLBACKS)
    taken = fallbacks.get(getattr(args, "cmd", ""), {})
    for dest, flag in OPTIONS.items():
        if dest in taken:
            if not hasattr(args, dest):
                setattr(args, dest, taken[dest])
        elif hasattr(args, dest):
            parser.error(f"inferq {args.cmd} takes no {flag}")
