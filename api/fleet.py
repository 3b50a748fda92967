"""The fleet as the API sees it: which base models and LoRA adapters live workers serve, by
how many workers, and how to count each model's prompts.

Why from the workers' heartbeats and not a setting: any number of workers, each serving one
base model (and its adapters), may come and go on other hosts; what a live worker loaded is
what can run. Read at most once a second. A request names a model; its base model's lanes
(core.lanes) are where its job goes, so only that model's workers take it.

- A base model or adapter a live worker serves: its base model.
- An adapter a live worker refused (and none serves): 404 `adapter_refused`, with why.
- A base model no live worker serves now, but that one did (keys.MODELS) or that this API
  was started with: 503 `model_unavailable` with `Retry-After`, never a job that waits for
  a worker that may never come. Batch lines queue instead (their batch's window bounds the
  wait, as OpenAI's batches do).
- Anything else: 404 `model_not_found`, naming what is served.

Prompts are counted with the model's own template (models.prompts), loaded on the first
request for that model from the path its workers announced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import anyio
import redis.asyncio as aredis

from api.errors import APIError
from api.status_view import live_workers
from core import keys
from core.config import Settings
from models.prompts import PromptCounter, counter_for, load_prompt_counter

logger = logging.getLogger(__name__)


class CounterHolder:
    """Loads the prompt counter (the model's template, no weights) off the event loop."""

    RETRY_S = 10.0

    def __init__(self, settings: Settings, load: Callable[[], PromptCounter] | None = None) -> None:
        self.settings = settings
        self._load = load or partial(load_prompt_counter, settings)
        self._task: asyncio.Task[PromptCounter] | None = None
        self._failed_at = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(anyio.to_thread.run_sync(self._load))

    @property
    def ready(self) -> bool:
        return self._task is not None and self._task.done() and self._task.exception() is None

    async def get(self) -> PromptCounter:
        """The counter, or a 503 naming why the model could not be loaded (a failed load is
        tried again after `RETRY_S`: the model directory may have been fixed meanwhile)."""
        if self._task is None or (self._failed_at and time.monotonic() - self._failed_at > self.RETRY_S):
            self._failed_at = 0.0
            self.start()
        assert self._task is not None
        try:
            return await asyncio.shield(self._task)
        except Exception as exc:
            if not self._failed_at:
                self._failed_at = time.monotonic()
                logger.error("the model could not be loaded: %s", exc)
            raise APIError(
                503,
                f"The model is not available: it could not be loaded ({type(exc).__name__}: {exc}).",
                code="model_unavailable",
                type_="server_error",
            ) from exc


@dataclass(frozen=True)
class Served:
    """One model the live workers serve (a base model or an adapter)."""

    id: str
    #: live workers serving it
    workers: int
    #: the base model of an adapter ("" for a base model)
    parent: str = ""
    context_length: int | None = None
    demo: bool = False


@dataclass
class _View:
    """One reading of the heartbeats."""

    bases: dict[str, Served] = field(default_factory=dict)
    adapters: dict[str, Served] = field(default_factory=dict)
    #: adapters a live worker refused and none serves: name -> why
    refused: dict[str, str] = field(default_factory=dict)


def _read_view(workers: list[dict[str, Any]]) -> _View:
    view = _View()
    base_count: dict[str, int] = {}
    adapter_count: dict[str, tuple[str, int]] = {}
    for w in workers:
        base = str(w.get("model", ""))
        base_count[base] = base_count.get(base, 0) + 1
        for name in w.get("adapters") or []:
            adapter_count[name] = (base, adapter_count.get(name, (base, 0))[1] + 1)
    facts = {str(w.get("model", "")): w for w in workers}
    for base, n in base_count.items():
        w = facts[base]
        view.bases[base] = Served(base, n, context_length=w.get("context_length"), demo=bool(w.get("demo")))
    for name, (base, n) in adapter_count.items():
        view.adapters[name] = Served(
            name, n, parent=base, context_length=view.bases[base].context_length, demo=view.bases[base].demo
        )
    refused = {n: why for w in workers for n, why in (w.get("refused_adapters") or {}).items()}
    view.refused = {n: why for n, why in refused.items() if n not in view.adapters}
    return view


class Fleet:
    def __init__(
        self, client: aredis.Redis, settings: Settings, own: CounterHolder, max_age_s: float = 1.0
    ) -> None:
        self.client = client
        self.settings = settings
        self.max_age_s = max_age_s
        #: the model this API was started with, counted with its own settings
        self.own = own
        self._counters: dict[str, CounterHolder] = {settings.model_id: own}
        self._view = _View()
        self._at = float("-inf")
        self._reading = asyncio.Lock()

    def forget(self) -> None:
        """The next lookup reads the heartbeats again (an adapter was just loaded or unloaded)."""
        self._at = float("-inf")

    async def view(self) -> _View:
        """The heartbeats as last read; read again once they are `max_age_s` old, by one
        request while the others use the old reading (a burst of requests finding it stale
        at once read it once: `inferq bench fleet` saw 0.46 reads per job without this)."""
        stale = time.monotonic() - self._at >= self.max_age_s
        if stale and (self._at == float("-inf") or not self._reading.locked()):
            async with self._reading:  # none read yet, or forgotten: every caller waits for it
                if time.monotonic() - self._at >= self.max_age_s:
                    self._view = _read_view(await live_workers(self.client))
                    self._at = time.monotonic()
        return self._view

    async def served(self) -> list[Served]:
        """Every model a live worker serves: base models, then adapters, each by name."""
        view = await self.view()
        return [*sorted(view.bases.values(), key=_id), *sorted(view.adapters.values(), key=_id)]

    async def adapter_names(self) -> frozenset[str]:
        return frozenset((await self.view()).adapters)

    async def refused(self, name: str) -> str | None:
        """Why a live worker refused the adapter `name` (None: none did, or one serves it)."""
        return (await self.view()).refused.get(name)

    async def announced(self, model: str) -> dict[str, Any] | None:
        """What a worker of base model `model` last announced (None: none ever did)."""
        raw = cast(str | None, await self.client.hget(keys.MODELS, model))
        return dict(json.loads(raw)) if raw else None

    async def find(self, model: str) -> Served | None:
        """The model as the fleet serves it now, or as it was last announced (0 workers)."""
        view = await self.view()
        if (served := view.bases.get(model) or view.adapters.get(model)) is not None:
            return served
        if (seen := await self.announced(model)) is not None:
            return Served(model, 0, context_length=seen.get("context_length"), demo=bool(seen.get("demo")))
        return None

    async def route(self, model: str, *, queue_unserved: bool = False) -> str:
        """The base model whose lanes run a request for `model`, or the error to answer
        (module doc). `queue_unserved`: a base model nobody serves now is still routed
        (batch lines)."""
        view = await self.view()
        if model in view.bases:
            return model
        if model in view.adapters:
            return view.adapters[model].parent
        if (reason := view.refused.get(model)) is not None:
            raise refused_error(model, reason)
        seen = await self.announced(model)
        if seen is None and model != self.settings.model_id:
            served = ", ".join(f"'{m}'" for m in sorted(view.bases)) or "none at the moment"
            raise APIError(
                404,
                f"The model '{model}' does not exist; the live workers serve {served} and their "
                "adapters (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )
        if queue_unserved:
            return model
        raise self.unavailable(model, seen)

    def unavailable(self, model: str, seen: dict[str, Any] | None) -> APIError:
        ago = ""
        if seen and "at" in seen:
            ago = f" (one was last seen {time.time() - float(seen['at']):.0f} s ago)"
        retry = self.settings.model_retry_after_s
        return APIError(
            503,
            f"No live worker serves the model '{model}' now{ago}; start one with "
            f"`inferq worker --model ...`, or retry after {retry} s.",
            param="model",
            code="model_unavailable",
            type_="server_error",
            headers={"Retry-After": str(retry)},
        )

    async def counter(self, base: str) -> PromptCounter:
        """The prompt counter of base model `base`, loaded on first use from what its
        workers announced."""
        holder = self._counters.get(base)
        if holder is None:
            seen = await self.announced(base)
            if seen is None:
                raise self.unavailable(base, None)
            holder = self._counters[base] = CounterHolder(
                self.settings, lambda: counter_for(base, seen, self.settings)
            )
        return await holder.get()


def refused_error(name: str, reason: str) -> APIError:
    """A request for an adapter the workers refused: 404 (no retry makes it servable; its
    files must change), with a code of its own and the reason: a worker found the adapter in
    INFERQ_ADAPTERS_DIR and refused it (broken files, another base model), and a client told
    "does not exist" would look for a typo."""
    return APIError(
        404,
        f"The adapter '{name}' was found but refused: {reason}",
        param="model",
        code="adapter_refused",
    )


def _id(served: Served) -> str:
    return served.id
