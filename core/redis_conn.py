"""Every Redis client of every process comes from here, made from the one URL setting.

Why one place: the API, the worker parent and child, the CLI and Celery must reach the same
server, and with Redis Sentinel "the server" moves: after a failover the primary is another
host. A `redis://` or `rediss://` URL is a plain client (`Redis.from_url`). A `sentinel://`
URL, in Celery's syntax (`sentinel://[:password@]host:port[/db];sentinel://host2:port;...`,
user, password and db taken from the first, as kombu takes them), gives a client whose pool
asks the sentinels for the primary of `Settings.redis_sentinel_master` at each new
connection, so it follows a failover by itself; while no primary is known its calls fail with
a ConnectionError (the API answers 503), never a hang. Redis Cluster is not supported (Celery's
Redis transport does not support it either).
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from core import keys

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
#: the longest a sentinel may take to answer; one that does not is skipped for the next
SENTINEL_TIMEOUT_S = 2.0
#: how long the fence written before a WAIT lives (it only has to outlive the WAIT)
FENCE_TTL_MS = 60_000


class NotReplicated(redis.exceptions.RedisError):
    """Fewer replicas than asked acknowledged a write in time. A RedisError, so the API
    answers it as any store failure: 503 with Retry-After."""


async def _closed_is_connection_error(sending: Awaitable[None]) -> None:
    """uvloop raises RuntimeError ("the handler is closed") where asyncio's own loop lets a
    write to a socket the server closed pass (MagicStack/uvloop#506): Redis dying while a
    connection is made or used. redis-py passes it on, and the API answered 500 (and dropped
    the HTTP connection) instead of 503; as a ConnectionError it is retried, then a 503."""
    try:
        await sending
    except RuntimeError as exc:
        raise redis.exceptions.ConnectionError(f"connection closed while writing ({exc})") from exc


class _Connection(aredis.Connection):
    """A plain `redis://` connection of the API's (asyncio) clients; see above."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        await _closed_is_connection_error(super().send_packed_command(command, check_health))


class _SentinelConnection(asentinel.SentinelManagedConnection):
    """A connection to the primary the sentinels name, for the API's clients; see above."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        await _closed_is_connection_error(super().send_packed_command(command, check_health))


@dataclass(frozen=True)
class SentinelURL:
    """A `sentinel://` URL, read as kombu reads it."""

    nodes: list[tuple[str, int]]
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelURL:
    """Each `;`-separated part names one sentinel; user, password and db come from the first
    part (as in kombu, so that the API and Celery agree). ValueError says what is wrong."""
    parts = [p.strip() for p in url.split(";") if p.strip()]
    nodes = []
    for part in parts:
        split = urlsplit(part)
        if split.scheme.lower() != SENTINEL_SCHEME or not split.hostname:
            raise ValueError(f"{part!r} is not sentinel://host[:port]; separate sentinels with ';'")
        if split.query:
            raise ValueError(f"{part!r}: options in the query string are not supported")
        nodes.append((split.hostname, split.port or SENTINEL_PORT))  # .port raises on a bad one
    if not nodes:
        raise ValueError("no sentinel named (sentinel://host:26379;sentinel://host2:26379)")
    first = urlsplit(parts[0])
    db = first.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"the database must be a number, not {db!r}")
    return SentinelURL(
        nodes,
        int(db),
        unquote(first.username) if first.username else None,
        unquote(first.password) if first.password else None,
    )


def sentinel_timeouts(timeout_s: float) -> dict[str, float]:
    """Socket timeouts for the sentinels themselves (kombu's `sentinel_kwargs`: plain values
    only, since Celery's control replies, Flower's worker pages, carry the broker's options
    as JSON): short, so that one that does not answer is passed over for the next."""
    t = min(timeout_s, SENTINEL_TIMEOUT_S)
    return {"socket_timeout": t, "socket_connect_timeout": t}


def _node_options(timeout_s: float, asynchronous: bool) -> dict[str, Any]:
    """`sentinel_timeouts` and no retries: a sentinel that is down costs one attempt, not
    redis-py's ten with backoff."""
    return {**sentinel_timeouts(timeout_s), "retry": _retry(0, asynchronous)}


def _retry(retries: int, asynchronous: bool) -> Retry | AsyncRetry:
    """redis-py's asyncio connections await their Retry: each kind takes its own class."""
    return AsyncRetry(NoBackoff(), retries) if asynchronous else Retry(NoBackoff(), retries)


def _sentinel_args(
    url: str, kwargs: dict[str, Any], asynchronous: bool
) -> tuple[list[tuple[str, int]], dict[str, Any], dict[str, Any]]:
    """The sentinels, their connection options, and the primary's: the URL's db and
    credentials, one immediate retry (a connection to a primary that was replaced asks the
    sentinels again and goes to the new one; while there is none, the call fails at once: a
    503, not a wait), then the caller's options (which win)."""
    parsed = parse_sentinel_url(url)
    timeout = kwargs.get("socket_connect_timeout") or kwargs.get("socket_timeout") or SENTINEL_TIMEOUT_S
    options = {
        "db": parsed.db,
        "username": parsed.username,
        "password": parsed.password,
        "retry": _retry(1, asynchronous),
        **kwargs,
    }
    return parsed.nodes, _node_options(float(timeout), asynchronous), options


def _master_name(master: str | None) -> str:
    if master is not None:
        return master
    from core.config import get_settings  # late: only sentinel URLs need the setting

    return get_settings().redis_sentinel_master


def sync_client(url: str, *, master: str | None = None, **kwargs: Any) -> redis.Redis:
    """A `redis.Redis` for `url` (kwargs as `Redis.from_url` takes them: decode_responses,
    socket_timeout, ...). `master`: the sentinels' name for the primary (default: the
    setting INFERQ_REDIS_SENTINEL_MASTER); ignored for other URLs."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    nodes, node_options, options = _sentinel_args(url, kwargs, asynchronous=False)
    sentinel = redis.sentinel.Sentinel(nodes, sentinel_kwargs=node_options)
    return cast(redis.Redis, sentinel.master_for(_master_name(master), redis_class=redis.Redis, **options))


def async_client(url: str, *, master: str | None = None, **kwargs: Any) -> aredis.Redis:
    """`sync_client`'s asyncio twin, for the API."""
    if not is_sentinel(url):
        if url.startswith("redis://"):  # not rediss:// nor unix://, which have classes of their own
            kwargs.setdefault("connection_class", _Connection)
        return aredis.Redis.from_url(url, **kwargs)
    nodes, node_options, options = _sentinel_args(url, kwargs, asynchronous=True)
    options.setdefault("connection_class", _SentinelConnection)
    sentinel = asentinel.Sentinel(nodes, sentinel_kwargs=node_options)
    return cast(aredis.Redis, sentinel.master_for(_master_name(master), redis_class=aredis.Redis, **options))


async def wait_replicas(client: aredis.Redis, replicas: int, timeout_ms: int, written: str) -> None:
    """Returns once `replicas` replicas hold the key `written` and every write made before;
    raises NotReplicated if they did not within `timeout_ms`. Why: replication is
    asynchronous, so a write the primary acknowledged can die with it and be missing on the
    replica promoted in its place. WAIT counts only its own connection's writes and the pool
    may hand out another connection than the one that wrote, so a fence write goes first, on
    the WAIT's connection: the replicas that acknowledged it hold everything written before
    it. The key is checked on that connection too: should it have moved to a new primary
    meanwhile (a retry after a failover), a record missing there is not answered as safe."""
    if replicas <= 0:
        return
    async with client.pipeline(transaction=False) as pipe:
        pipe.exists(written)
        pipe.set(keys.REPLICATION_FENCE, "1", px=FENCE_TTL_MS)
        pipe.wait(replicas, timeout_ms)
        present, _, acked = await pipe.execute()
    if not present:
        raise NotReplicated(f"{written} is not on the primary any more (a failover)")
    if int(acked) < replicas:
        raise NotReplicated(f"{acked} of {replicas} replicas acknowledged the write within {timeout_ms} ms")
