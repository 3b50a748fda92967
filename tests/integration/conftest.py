"""Fixtures that start processes: Valkey (or flush the Redis named by
INFERQ_TEST_REDIS_URL), and whole stacks (tests/support/stack.py). Each process dies with
the test run, even a killed one (tests/support/procs.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import pytest
import redis

from cli.processes import free_port, port_open, valkey_argv
from tests.support.procs import supervisor
from tests.support.stack import Stack, blockers, fresh_db, stack_env, start_stack
from tests.support.wait import eventually


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("INFERQ_TEST_REDIS_URL")
    if external:
        client = redis.Redis.from_url(external)
        client.flushdb()
        client.close()
        yield external
        return
    sup = supervisor()
    port = free_port()
    proc = sup.start(
        "valkey", valkey_argv(port, tmp_path_factory.mktemp("valkey")), stdout=subprocess.DEVNULL
    )

    def listening() -> bool:
        assert proc.poll() is None, f"valkey exited with code {proc.returncode}"
        return port_open(port)

    eventually(listening, timeout=15, interval=0.1, message="valkey listening")
    yield f"redis://127.0.0.1:{port}/0"
    sup.stop_all()


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _cancel_blockers() -> Iterator[None]:
    """In continuous mode a blocking job runs on beside its batch-mates: end it with its test."""
    yield
    while blockers:
        stack, job = blockers.pop()
        httpx.post(f"{stack.base_url}/v1/jobs/{job}/cancel", timeout=30)
        stack.wait_job(job)


@pytest.fixture(scope="session")
def echo_stack(redis_url: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + worker running the fake echo engine (with its failure triggers), in its own db."""
    url = fresh_db(redis_url, 14)
    home = tmp_path_factory.mktemp("echo-home")
    env = stack_env(
        url, demo_model, home, INFERQ_ENGINE="echo", INFERQ_STALL_TIMEOUT_S="2", INFERQ_ECHO_OOM_ABOVE="3"
    )
    st = start_stack(env, home)
    yield st
    st.sup.stop_all()


@pytest.fixture(scope="session")
def stack(redis_url: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("home")
    st = start_stack(stack_env(redis_url, demo_model, home), home)
    yield st
    st.sup.stop_all()


@pytest.fixture(scope="session")
def continuous_stack(
    redis_url: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The real stack with the worker in continuous-batching mode, in its own db."""
    url = fresh_db(redis_url, 9)
    home = tmp_path_factory.mktemp("continuous-home")
    st = start_stack(stack_env(url, demo_model, home, INFERQ_ENGINE_MODE="continuous"), home)
    yield st
    st.sup.stop_all()


@pytest.fixture(params=["static", "continuous"])
def any_stack(request: pytest.FixtureRequest) -> Stack:
    """The real stack in each engine mode."""
    name = "stack" if request.param == "static" else "continuous_stack"
    return cast(Stack, request.getfixturevalue(name))


@pytest.fixture(scope="session")
def extras_stack(
    redis_url: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The real stack with the plug-ins on, in its own db: the house hooks of
    tests/support/hooks.py (and a default system prompt), and webhooks with a retry
    schedule of seconds that may reach this machine's loopback receivers."""
    url = fresh_db(redis_url, 1)
    home = tmp_path_factory.mktemp("extras-home")
    env = stack_env(
        url,
        demo_model,
        home,
        INFERQ_HOOKS='["tests.support.hooks:house"]',
        INFERQ_SYSTEM_PROMPTS='{"tiny": "You are the house assistant."}',
        INFERQ_WEBHOOK_RETRY_S="[0.5, 1.0, 2.0]",
        INFERQ_WEBHOOK_ALLOW_HOSTS='["127.0.0.1"]',
    )
    st = start_stack(env, home)
    yield st
    st.sup.stop_all()
