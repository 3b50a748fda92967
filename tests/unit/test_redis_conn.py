"""`sentinel://` URLs read as kombu reads them, so that the API, the workers and Celery reach
the same primary; clients made without connecting (the failover itself is
tests/integration/test_sentinel_failover.py)."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio as aredis
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.sentinel import SentinelConnectionPool

from cli import preflight
from core import redis_conn
from core.redis_conn import SentinelURL, parse_sentinel_url

URL = "sentinel://:s3cr%40t@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380"


def test_a_url_names_each_sentinel_and_the_first_part_gives_db_and_password() -> None:
    assert parse_sentinel_url(URL) == SentinelURL(
        nodes=[("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)],
        db=2,
        username=None,
        password="s3cr@t",
    )
    assert parse_sentinel_url("sentinel://u:p@h") == SentinelURL([("h", 26379)], 0, "u", "p")


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("sentinel://h:26379;redis://h2:6379", "is not sentinel://host"),
        ("sentinel://h:port", "Port could not be cast"),
        ("sentinel://h/zero", "must be a number"),
        ("sentinel://h?socket_timeout=1", "query string"),
        ("sentinel://", "is not sentinel://host"),
    ],
)
def test_a_malformed_url_says_what_is_wrong(url: str, said: str) -> None:
    with pytest.raises(ValueError, match=said):
        parse_sentinel_url(url)
    assert said in preflight.redis_problems(url, must_answer=False)[0]


def test_plain_urls_stay_plain_and_sentinel_ones_ask_the_sentinels() -> None:
    plain = redis_conn.sync_client("redis://127.0.0.1:6379/3", socket_timeout=1)
    assert type(plain.connection_pool) is redis.ConnectionPool
    client = redis_conn.sync_client(URL, master="queue", decode_responses=True, socket_timeout=3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "queue"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "s3cr@t"
    assert pool.connection_kwargs["socket_timeout"] == 3
    # the sentinels themselves: a short timeout and no retries, so a dead one is skipped at once
    node = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert node["socket_timeout"] == redis_conn.SENTINEL_TIMEOUT_S and node["retry"].get_retries() == 0


def test_the_async_client_follows_the_same_rules() -> None:
    async def make() -> aredis.Redis:
        return redis_conn.async_client(URL, master="queue", socket_timeout=1, socket_connect_timeout=0.5)

    client = asyncio.run(make())
    assert isinstance(client.connection_pool, AsyncSentinelPool)
    assert client.connection_pool.service_name == "queue"
    node = client.connection_pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert node["socket_connect_timeout"] == 0.5


def test_without_a_master_name_the_setting_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import get_settings

    monkeypatch.setenv("INFERQ_REDIS_SENTINEL_MASTER", "jobs-primary")
    get_settings.cache_clear()
    try:
        pool = redis_conn.sync_client(URL).connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "jobs-primary"
    finally:
        get_settings.cache_clear()


def test_no_sentinel_answering_is_a_problem_named_within_seconds() -> None:
    problems = preflight.redis_problems("sentinel://127.0.0.1:1;sentinel://127.0.0.1:2", must_answer=True)
    assert len(problems) == 1 and "cannot reach" in problems[0]
    assert "INFERQ_REDIS_SENTINEL_MASTER" in problems[0]


def test_a_write_to_a_closed_uvloop_transport_is_a_connection_error() -> None:
    async def closed() -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    with pytest.raises(redis.ConnectionError, match="the handler is closed"):
        asyncio.run(redis_conn._closed_is_connection_error(closed()))
    assert redis_conn.async_client("redis://127.0.0.1:1/0").connection_pool.connection_class.__name__ == (
        "_Connection"
    )
