"""Real parts: a real Valkey (or the Redis named by INFERQ_TEST_REDIS_URL), real Celery
worker processes running the real ms-swift engine on a tiny random model, the real API
under uvicorn, and Flower."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import pytest
import redis

from cli.processes import (
    Supervisor,
    api_argv,
    flower_argv,
    free_port,
    port_open,
    valkey_argv,
    wait_for,
    worker_argv,
)
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE, build_demo_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("INFERQ_TEST_REDIS_URL")
    if external:
        client = redis.Redis.from_url(external)
        client.flushdb()
        client.close()
        yield external
        return
    sup = Supervisor()
    port = free_port()
    proc = sup.start(
        "valkey", valkey_argv(port, tmp_path_factory.mktemp("valkey")), stdout=subprocess.DEVNULL
    )
    wait_for(lambda: port_open(port), 15, "valkey", proc)
    yield f"redis://127.0.0.1:{port}/0"
    sup.stop_all()


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, made to never emit EOS or <|endoftext|> (via its generation_config, which both
    ms-swift and plain transformers honour): every generation runs to `max_tokens` or a
    stop sequence, so cancel and streaming tests have long generations to work with."""
    path = build_demo_model(tmp_path_factory.mktemp("model") / "tiny-qwen2")
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(path)
    # <|endoftext|> (pad) is a template stop word too
    GenerationConfig(
        suppress_tokens=[tok.eos_token_id, tok.pad_token_id], eos_token_id=tok.eos_token_id
    ).save_pretrained(path)
    return path


@dataclass
class Stack:
    base_url: str
    flower_url: str
    redis_url: str
    env: dict[str, str]
    sup: Supervisor
    log: Path

    @property
    def continuous(self) -> bool:
        return self.env.get("INFERQ_ENGINE_MODE") == "continuous"

    def block_worker(self) -> str:
        """A long job keeps the worker busy so that what follows piles up as a backlog (in
        continuous mode the others join it instead); it is cancelled when the test ends."""
        job = self.submit("hold the worker", max_tokens=600, temperature=0.9)
        _blockers.append((self, job))
        deadline = time.monotonic() + 30
        while httpx.get(f"{self.base_url}/v1/jobs/{job}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return job

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def submit(self, content: str, **kw: object) -> str:
        """POST /v1/jobs with one user message; returns the job id."""
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}
        resp = httpx.post(f"{self.base_url}/v1/jobs", json=body, timeout=30)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def wait_job(self, job_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                job = c.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
                    return job
                time.sleep(0.05)
        raise TimeoutError(f"job {job_id} not finished in {timeout}s")


_blockers: list[tuple[Stack, str]] = []


@pytest.fixture(autouse=True)
def _cancel_blockers() -> Iterator[None]:
    """In continuous mode a blocking job runs on beside its batch-mates: end it with its test."""
    yield
    while _blockers:
        stack, job = _blockers.pop()
        httpx.post(f"{stack.base_url}/v1/jobs/{job}/cancel", timeout=30)
        stack.wait_job(job)


def proc_file(pid: int, name: str) -> bytes:
    """/proc/<pid>/<name> of a process that may have ended meanwhile (b"" then)."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def cli_env(**extra: str) -> dict[str, str]:
    """A user's environment for the `inferq` command: none of this test run's INFERQ_* or
    REDIS_URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_") and k != "REDIS_URL"}
    env.update(extra)
    return env


def stack_env(redis_url: str, model: Path, home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        INFERQ_REDIS_URL=redis_url,
        INFERQ_MODEL_PATH=str(model),
        INFERQ_MODEL_TYPE=DEMO_MODEL_TYPE,
        INFERQ_TEMPLATE=DEMO_TEMPLATE,
        INFERQ_SERVED_MODEL_NAME="tiny",
        INFERQ_HOME=str(home),
        INFERQ_HEARTBEAT_INTERVAL_S="0.5",
        INFERQ_LIVENESS_S="3",
        INFERQ_MAX_BATCH_SIZE="8",
        PYTORCH_NVML_BASED_CUDA_CHECK="1",
        TOKENIZERS_PARALLELISM="false",
        FLOWER_UNAUTHENTICATED_API="true",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def wait_ready(base_url: str, timeout: float = 120, headers: dict[str, str] | None = None) -> None:
    def ok() -> bool:
        return httpx.get(f"{base_url}/ready", timeout=2, headers=headers).status_code == 200

    wait_for(ok, timeout, "stack /ready", interval=0.25)


def start_stack(env: dict[str, str], home: Path, ready_headers: dict[str, str] | None = None) -> Stack:
    log = home / "stack.log"
    sup = Supervisor()
    api_port, flower_port = free_port(), free_port()
    with log.open("wb") as fh:
        sup.start(
            "worker",
            worker_argv(["inferq.interactive", "inferq.jobs", "inferq.batch"]),
            env=env,
            cwd=ROOT,
            stdout=fh.fileno(),
        )
        sup.start("api", api_argv("127.0.0.1", api_port), env=env, cwd=ROOT, stdout=fh.fileno())
        sup.start("flower", flower_argv("127.0.0.1", flower_port), env=env, cwd=ROOT, stdout=fh.fileno())
    base = f"http://127.0.0.1:{api_port}"
    try:
        wait_ready(base, headers=ready_headers)
    except Exception:
        print(log.read_text()[-5000:])
        sup.stop_all()
        raise
    return Stack(base, f"http://127.0.0.1:{flower_port}", env["INFERQ_REDIS_URL"], env, sup, log)


def with_db(url: str, db: int) -> str:
    """The same server, another database: a second stack whose queues and keys stay apart."""
    base, _, last = url.rpartition("/")
    return f"{base}/{db}" if last.isdigit() else f"{url.rstrip('/')}/{db}"


def fresh_db(url: str, db: int) -> str:
    """`url` on database `db`, emptied: a stack of its own, apart from the others' workers."""
    url = with_db(url, db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


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
