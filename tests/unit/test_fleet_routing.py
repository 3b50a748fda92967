"""Routing by model (api.fleet): which base model's lanes a request goes to, or why not."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from api.errors import APIError
from api.fleet import CounterHolder, Fleet
from core import keys, lanes
from core.config import Settings


class FakeRedis:
    """The four reads Fleet makes, over heartbeats and announced models held in dicts."""

    def __init__(self, workers: list[dict[str, Any]], announced: dict[str, dict[str, Any]]) -> None:
        self.beats = {w["worker_id"]: json.dumps(w) for w in workers}
        self.announced = {m: json.dumps(a) for m, a in announced.items()}

    async def zrange(self, key: str, start: int, end: int) -> list[str]:
        assert key == keys.WORKERS
        return list(self.beats)

    async def mget(self, names: list[str]) -> list[str | None]:
        return [self.beats.get(n.removeprefix(keys.WORKER_PREFIX)) for n in names]

    async def zrem(self, key: str, *ids: str) -> int:
        return 0

    async def hget(self, key: str, field: str) -> str | None:
        assert key == keys.MODELS
        return self.announced.get(field)


WORKERS: list[dict[str, Any]] = [
    {"worker_id": "a:1", "model": "chat", "adapters": ["chat-legal"], "context_length": 4096},
    {
        "worker_id": "a:2",
        "model": "chat",
        "adapters": ["chat-legal"],
        "refused_adapters": {"broken": "bad header"},
    },
    {"worker_id": "b:1", "model": "coder", "adapters": [], "context_length": 8192},
]


def _fleet(workers: list[dict[str, Any]] = WORKERS, announced: dict[str, Any] | None = None) -> Fleet:
    settings = Settings(served_model_name="chat", model_retry_after_s=7)
    client: Any = FakeRedis(workers, announced or {})
    return Fleet(client, settings, CounterHolder(settings, lambda: None))  # type: ignore[arg-type,return-value]


def _route(fleet: Fleet, model: str, **kw: bool) -> str:
    return asyncio.run(fleet.route(model, **kw))


def test_a_model_goes_to_its_base_models_lanes() -> None:
    fleet = _fleet()
    assert _route(fleet, "chat") == "chat"
    assert _route(fleet, "coder") == "coder"
    assert _route(fleet, "chat-legal") == "chat"  # an adapter runs where its base model runs
    assert lanes.lane("inferq.jobs", "coder") == "inferq.jobs@coder"
    assert lanes.parts("inferq.jobs@org/model@v2") == ("inferq.jobs", "org/model@v2")


def test_the_served_list_counts_each_models_live_workers() -> None:
    served = {s.id: (s.workers, s.parent) for s in asyncio.run(_fleet().served())}
    assert served == {"chat": (2, ""), "coder": (1, ""), "chat-legal": (2, "chat")}


def test_a_refused_adapter_says_why() -> None:
    with pytest.raises(APIError) as err:
        _route(_fleet(), "broken")
    assert (
        err.value.status == 404 and err.value.code == "adapter_refused" and "bad header" in err.value.message
    )


def test_a_model_whose_workers_are_gone_is_unavailable_with_retry_after() -> None:
    fleet = _fleet(WORKERS[2:], announced={"vision": {"at": time.time() - 30}})
    for model in ("chat", "vision"):  # the API's own model; one a worker announced before
        with pytest.raises(APIError) as err:
            _route(fleet, model)
        assert (
            err.value.status == 503 and err.value.code == "model_unavailable" and err.value.param == "model"
        )
        assert err.value.headers == {"Retry-After": "7"}
    assert "30 s ago" in fleet.unavailable("vision", {"at": time.time() - 30}).message
    assert _route(fleet, "vision", queue_unserved=True) == "vision"  # a batch line waits for one


def test_a_model_never_served_is_not_found_and_the_answer_names_what_is() -> None:
    with pytest.raises(APIError) as err:
        _route(_fleet(), "gpt-4o")
    assert err.value.status == 404 and err.value.code == "model_not_found"
    assert "'chat', 'coder'" in err.value.message
