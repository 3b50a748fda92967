"""The LoRA adapters the API accepts as a `model`: those the live workers say they serve.

Why from the workers' heartbeats and not a scan of INFERQ_ADAPTERS_DIR here: the API may run
on a host without the directory, and a worker may refuse an adapter (broken, wrong base); what
a worker loaded is what can run. Read at most once a second, and only for a request whose
`model` is not the base model."""

from __future__ import annotations

import time

import redis.asyncio as aredis

from api.status_view import live_workers


class AdapterCatalog:
    def __init__(self, client: aredis.Redis, max_age_s: float = 1.0) -> None:
        self.client = client
        self.max_age_s = max_age_s
        self._names: frozenset[str] = frozenset()
        self._at = float("-inf")

    def forget(self) -> None:
        """The next lookup reads the heartbeats again (an adapter was just loaded or unloaded)."""
        self._at = float("-inf")

    async def names(self) -> frozenset[str]:
        if time.monotonic() - self._at >= self.max_age_s:
            workers = await live_workers(self.client)
            self._names = frozenset(a for w in workers for a in w.get("adapters") or [])
            self._at = time.monotonic()
        return self._names
