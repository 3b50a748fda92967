"""The Lua scripts (core/lua/*.lua), read once with the key prefixes of core.keys filled in.

Why files: each script starts with a header naming every KEYS and ARGV entry, and reads as
Lua in an editor (rq keeps its scripts apart the same way). The scripts name key families
as `{job}`, `{ready}`, ... so that every key name still comes from core.keys.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

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
