"""Who is calling: API key check, per-key rate limit, and the owner id routes filter by.

Without keys configured the owner is "" and everything is shared (a single-team install on
loopback, which `inferq run` enforces unless told `--insecure`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api import rate_limit
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
    if settings.rate_limit_per_minute:
        await rate_limit.enforce(request, st.redis, owner, settings.rate_limit_per_minute)
    return owner


OwnerDep = Annotated[str, Depends(current_owner)]


async def owner_scope(st: StateDep, owner: OwnerDep) -> str | None:
    return scope_of(owner, st.settings.auth_enabled)


ScopeDep = Annotated[str | None, Depends(owner_scope)]
