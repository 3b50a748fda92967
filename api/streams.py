"""Reading a job's event stream: the one source for SSE, chat streaming and waiting.

Why XREAD BLOCK from the client's last id: each connection has one reader that sleeps in
Redis until something happens (no polling loop), and resuming after a disconnect is just
reading from the last id the client saw.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aredis

from core import keys

TERMINAL_EVENTS = frozenset({"done", "error", "cancelled"})


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    fields: dict[str, str]

    def data(self) -> dict[str, Any]:
        """The JSON payload a client sees for this event."""
        f = self.fields
        if self.type == "token":
            return {
                "index": int(f.get("index", 0)),
                "text": f.get("text", ""),
                "attempt": int(f.get("attempt", 1)),
            }
        if self.type in ("done", "cancelled") and f.get("result"):
            return dict(json.loads(f["result"]))
        if self.type == "error" and f.get("error"):
            return dict(json.loads(f["error"]))
        out: dict[str, Any] = {k: v for k, v in f.items() if k != "type"}
        for key in ("attempt", "index"):  # numbers, as in token events
            if key in out and str(out[key]).isdigit():
                out[key] = int(out[key])
        return out


async def read_events(
    client: aredis.Redis, job_id: str, last_id: str = "0-0", block_ms: int = 15_000
) -> AsyncIterator[Event | None]:
    """Yields events after `last_id` until a terminal one; `None` after each idle block,
    so the caller can send a keep-alive or check its client."""
    key = keys.job_events(job_id)
    while True:
        reply = cast(list[Any], await client.xread({key: last_id}, block=block_ms, count=500))
        if not reply:
            yield None
            continue
        entries: list[tuple[str, dict[str, str]]] = reply[0][1]
        for entry_id, fields in entries:
            last_id = entry_id
            event = Event(entry_id, fields.get("type", ""), fields)
            yield event
            if event.type in TERMINAL_EVENTS:
                return
