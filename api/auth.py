"""Who is calling: API key check, per-key rate limit, and the owner id routes filter by.

Without keys configured the owner is "" and everything is shared (a single-team install on
loopback, which `inferq run` enforces unless told `--insecure`)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from api.deps import StateDep
from api.errors import APIError
from core import keys
from core.auth import hash_key, owner_of, scope_of


def bearer_token(request: Request) -> str:
    """The token of an `Authorization: Bearer <token>` header ("" without one)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def current_owner(request: Request, st: StateDep) -> str:
    settings = st.settings
    if not settings.auth_enabled:
        return ""
    token = bearer_token(request)
    if not token:
        raise APIError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            type_="authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )
    digest = hash_key(token)
    if digest not in st.key_hashes and not await st.redis.exists(keys.api_key(digest)):
        raise APIError(
            401,
            "Invalid API key.",
            code="invalid_api_key",
            type_="authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )
    owner = owner_of(digest)
    limit = settings.rate_limit_per_minute
    if limit:
        now = time.time()
        key = keys.rate(owner, int(now // 60))
        async with st.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 60)
            count, _ = await pipe.execute()
        if count > limit:
            retry = str(max(1, 60 - int(now % 60)))
            raise APIError(
                429,
                f"Rate limit of {limit} requests per minute reached; retry in {retry}s.",
                code="rate_limit_exceeded",
                type_="rate_limit_error",
                headers={"Retry-After": retry},
            )
    return owner


OwnerDep = Annotated[str, Depends(current_owner)]


async def owner_scope(st: StateDep, owner: OwnerDep) -> str | None:
    return scope_of(owner, st.settings.auth_enabled)


ScopeDep = Annotated[str | None, Depends(owner_scope)]
