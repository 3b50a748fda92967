"""Loading and unloading LoRA adapters on demand, in vLLM's shape
(`POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`, `{"lora_name", "lora_path"}`).

Why through Redis: workers may run on other hosts, and each applies the request on its next
sync (within `ADAPTER_POLL_S`); the call answers once a live worker serves (or stopped
serving) the adapter, or with the reason a worker refused it. The path is the workers'.
INFERQ_ADAPTERS_DIR stays the truth: an unload hides an adapter there only until its files
change or a worker starts (workers.adapters.Unloads)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from api.auth import OwnerDep, bearer_token
from api.deps import StateDep
from api.errors import APIError, error_responses
from api.status_view import live_workers
from core import keys
from core.auth import configured_hashes, hash_key

router = APIRouter(tags=["adapters"])

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: how long a call waits for a worker to act on it (under a client's usual 30 s timeout)
WAIT_S = 20.0


class LoadAdapter(BaseModel):
    lora_name: str = Field(description="the `model` id the adapter is served as")
    lora_path: str = Field(min_length=1, description="its directory, as the workers see it")


class UnloadAdapter(BaseModel):
    lora_name: str
    lora_path: str | None = None


class AdapterStatus(BaseModel):
    object: str = "lora_adapter"
    lora_name: str
    status: str


async def require_admin(request: Request, st: StateDep, _: OwnerDep) -> None:
    """With keys on, an admin key (INFERQ_ADMIN_KEYS); without keys, anyone (loopback)."""
    if not st.settings.auth_enabled:
        return
    token = bearer_token(request)
    if not token or hash_key(token) not in configured_hashes(st.settings.admin_keys):
        raise APIError(
            403,
            "Loading and unloading adapters needs an admin key (INFERQ_ADMIN_KEYS).",
            code="admin_key_required",
            type_="permission_error",
        )


AdminDep = Annotated[None, Depends(require_admin)]


async def _served(st: StateDep) -> frozenset[str]:
    """What live workers serve now (not the catalog's second-old copy)."""
    st.fleet.forget()
    return await st.fleet.adapter_names()


@router.post(
    "/v1/load_lora_adapter",
    response_model=AdapterStatus,
    summary="Load a LoRA adapter on every worker",
    responses=error_responses(400, 403, 504),
)
async def load_adapter(body: LoadAdapter, st: StateDep, _: AdminDep) -> AdapterStatus:
    name = body.lora_name
    if not NAME.match(name) or name == st.settings.model_id:
        raise APIError(
            400,
            f"Invalid lora_name '{name}': letters, digits, '.', '_' and '-', not the base model's id.",
            param="lora_name",
        )
    path = body.lora_path
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise APIError(400, "lora_path must be an absolute path on the workers' hosts.", param="lora_path")
    if not any(w.get("lora") for w in await live_workers(st.redis)):
        raise APIError(
            400,
            "No live worker serves LoRA adapters by name (static engine mode with ms-swift does).",
            param="lora_name",
            code="adapters_unsupported",
        )
    started = time.time()
    await st.redis.hdel(keys.ADAPTER_REFUSALS, name)
    await st.redis.hset(keys.ADAPTER_OVERRIDES, name, json.dumps({"path": body.lora_path}))
    await st.redis.expire(keys.ADAPTER_OVERRIDES, st.settings.result_ttl_s)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        refusal = await st.redis.hget(keys.ADAPTER_REFUSALS, name)
        if refusal and json.loads(refusal).get("at", 0) >= started:
            await st.redis.hdel(keys.ADAPTER_OVERRIDES, name)
            reason = json.loads(refusal)["reason"]
            raise APIError(400, f"The adapter '{name}' was refused: {reason}", param="lora_path")
        if name in await _served(st):
            return AdapterStatus(lora_name=name, status="loaded")
        await asyncio.sleep(0.2)
    raise APIError(504, f"No worker has loaded '{name}' yet; it stays asked for.", code="timeout")


@router.post(
    "/v1/unload_lora_adapter",
    response_model=AdapterStatus,
    summary="Unload a LoRA adapter from every worker",
    responses=error_responses(400, 403, 404, 504),
)
async def unload_adapter(body: UnloadAdapter, st: StateDep, _: AdminDep) -> AdapterStatus:
    name = body.lora_name
    if name not in await _served(st) and not await st.redis.hexists(keys.ADAPTER_OVERRIDES, name):
        raise APIError(404, f"No adapter '{name}' is served.", param="lora_name", code="model_not_found")
    # `at`: each unload a new entry, which a worker holds against the directory as it finds it
    # then (workers.adapters.Unloads: it ends when the directory's entry appears or changes)
    await st.redis.hset(keys.ADAPTER_OVERRIDES, name, json.dumps({"unloaded": True, "at": time.time()}))
    await st.redis.expire(keys.ADAPTER_OVERRIDES, st.settings.result_ttl_s)
    deadline = time.monotonic() + WAIT_S
    while name in await _served(st):
        if time.monotonic() > deadline:
            raise APIError(504, f"'{name}' is still served by a worker; it stays asked for.", code="timeout")
        await asyncio.sleep(0.2)
    return AdapterStatus(lora_name=name, status="unloaded")
