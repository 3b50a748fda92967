"""API keys: bearer tokens, stored only as SHA-256 hashes.

Keys come from INFERQ_API_KEYS (raw keys, or `sha256:<hex>` so that not even the
environment holds them) or from `inferq keys create`, which stores the hash in Redis with a
TTL. A key's owner id (a prefix of its hash) is what jobs, batches and files belong to.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import redis

from core import keys


def scope_of(owner: str, auth_enabled: bool) -> str | None:
    """What a caller may see: its own objects with keys configured (None: everything)."""
    return owner if auth_enabled else None


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def owner_of(key_hash: str) -> str:
    return f"key_{key_hash[:16]}"


def configured_hashes(entries: list[str]) -> set[str]:
    return {e.removeprefix("sha256:") if e.startswith("sha256:") else hash_key(e) for e in entries}


def new_key() -> str:
    return f"iq-{secrets.token_urlsafe(32)}"


def create_key(client: redis.Redis, name: str, ttl_s: int) -> tuple[str, str]:
    """Returns (raw key, owner id); only the hash is stored."""
    raw = new_key()
    digest = hash_key(raw)
    client.set(
        keys.api_key(digest),
        json.dumps({"name": name, "owner": owner_of(digest), "created_at": int(time.time())}),
        ex=ttl_s,
    )
    return raw, owner_of(digest)
