"""The Lua scripts (core/lua/*.lua), read once with the key prefixes of core.keys filled in.

Why files: each script starts with a header naming every KEYS and ARGV entry, and reads as
Lua in an editor (rq keeps its scripts apart the same way). The scripts name key families
as `{job}`, `{ready}`, ... so that every key name still comes from core.keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from core import keys, metrics

_PREFIXES = {
    "{job}": keys.JOB_PREFIX,
    "{ready}": keys.READY_PREFIX,
    "{worker}": keys.WORKER_PREFIX,
    "{processing}": keys.PROCESSING_PREFIX,
    "{active}": keys.ACTIVE_PREFIX,
    "{metrics}": keys.METRICS,
    "{failures}": keys.FAILURES,
    "{failures_maxlen}": str(keys.FAILURES_MAXLEN),
    "{webhook_events_maxlen}": str(keys.WEBHOOK_EVENTS_MAXLEN),
    "{webhook_events}": keys.WEBHOOK_EVENTS,
    "{webhook_index}": keys.WEBHOOK_INDEX,
    "{webhooks_configured}": keys.WEBHOOKS_CONFIGURED,
}


@cache
def source(name: str) -> str:
    """The script `core/lua/<name>.lua`, its key prefixes filled in."""
    text = resources.files("core").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    for placeholder, prefix in _PREFIXES.items():
        text = text.replace(placeholder, prefix)
    return text


@cache
def transition() -> str:
    """The transition script, after the histogram helper it calls (`observe`)."""
    return metrics.lua_buckets() + "\n" + source("observe") + source("transition")


#: one script call: its KEYS and its ARGV
Call = tuple[Sequence[str], Sequence[Any]]


def run_pipelined(
    client: redis.Redis, script: Script, calls: Sequence[Call], also: Callable[[Any], None] | None = None
) -> list[Any]:
    """Each call one `EVALSHA` of `script`, all in one round trip (with whatever `also` adds
    to the pipeline first, sent once); the scripts' replies in order, the first error raised.

    Why not redis-py's own pipelined `Script`: its `execute` sends `SCRIPT EXISTS` before
    every pipeline that holds a script, a round trip more per engine call (0.8 a job in
    `inferq bench fleet`). Here the script is loaded only when Redis says it is missing (a
    restart, `SCRIPT FLUSH`), and only the calls that found it missing are sent again."""
    replies = _evalsha_all(client, script.sha, calls, range(len(calls)), also)
    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
    if missing:
        client.script_load(script.script)
        for i, reply in zip(missing, _evalsha_all(client, script.sha, calls, missing), strict=True):
            replies[i] = reply
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _evalsha_all(
    client: redis.Redis,
    sha: str,
    calls: Sequence[Call],
    which: Sequence[int],
    also: Callable[[Any], None] | None = None,
) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    if also is not None:
        also(pipe)
    first = len(pipe)
    for i in which:
        call_keys, args = calls[i]
        pipe.evalsha(sha, len(call_keys), *call_keys, *args)
    replies = list(pipe.execute(raise_on_error=False))
    for reply in replies[:first]:
        if isinstance(reply, Exception):
            raise reply
    return replies[first:]
