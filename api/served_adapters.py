"""The LoRA adapters the API accepts as a `model`: those the live workers say they serve.

Why from the workers' heartbeats and not a scan of INFERQ_ADAPTERS_DIR here: the API may run
on a host without the directory, and a worker may refuse an adapter (broken, wrong base); what
a worker loaded is what can run. Read at most once a second, and only for a request whose
`model` is not the base model. The heartbeats also name the adapters a worker refused, with
why: a request for one is told that it was found and refused, not that it does not exist."""

from __future__ import annotations

import time

import redis.asyncio as aredis

from api.errors import APIError
from api.status_view import live_workers


class AdapterCatalog:
    def __init__(self, client: aredis.Redis, max_age_s: float = 1.0) -> None:
        self.client = client
        self.max_age_s = max_age_s
        self._names: frozenset[str] = frozenset()
        #: adapters a live worker refused and none serves: name -> why
        self._refused: dict[str, str] = {}
        self._at = float("-inf")

    def forget(self) -> None:
        """The next lookup reads the heartbeats again (an adapter was just loaded or unloaded)."""
        self._at = float("-inf")

    async def names(self) -> frozenset[str]:
        if time.monotonic() - self._at >= self.max_age_s:
            workers = await live_workers(self.client)
            self._names = frozenset(a for w in workers for a in w.get("adapters") or [])
            refused = {n: why for w in workers for n, why in (w.get("refused_adapters") or {}).items()}
            self._refused = {n: why for n, why in refused.items() if n not in self._names}
            self._at = time.monotonic()
        return self._names

    async def refused(self, name: str) -> str | None:
        """Why a live worker refused the adapter `name` (None: none did, or one serves it)."""
        await self.names()
        return self._refused.get(name)


def refused_error(name: str, reason: str) -> APIError:
    """A request for an adapter the workers refused: 404 (no retry makes it servable; its
    files must change), with a code of its own and the reason, unlike a `model` nobody has."""
    return APIError(
        404,
        f"The adapter '{name}' was found but refused: {reason}",
        param="model",
        code="adapter_refused",
    )
