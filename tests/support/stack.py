"""A running stack for the integration tests: the real API under uvicorn, a real Celery
worker running the real ms-swift engine on the tiny model (or the echo engine), and Flower,
on a real Valkey/Redis. The fixtures that start them are in tests/integration/conftest.py;
this is how a test starts one of its own and talks to it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

from cli.processes import Supervisor, api_argv, flower_argv, free_port, worker_argv
from core.config import Settings
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE
from tests.support import ROOT
from tests.support.procs import supervisor
from tests.support.wait import eventually

FINISHED = ("succeeded", "failed", "cancelled", "expired")


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
        blockers.append((self, job))
        self.wait_running(job)
        return job

    def wait_running(self, job_id: str, timeout: float = 30) -> None:
        """Until the job is running on a worker (a job it holds the worker with)."""

        def running() -> bool:
            status = httpx.get(f"{self.base_url}/v1/jobs/{job_id}").json()["status"]
            assert status not in FINISHED, f"job {job_id} {status} before it was seen running"
            return bool(status == "running")

        eventually(running, timeout=timeout, interval=0.02, message=f"job {job_id} running")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30)

    def submit(self, content: str, **kw: object) -> str:
        """POST /v1/jobs with one user message; returns the job id."""
        body = {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}
        resp = httpx.post(f"{self.base_url}/v1/jobs", json=body, timeout=30)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def wait_job(self, job_id: str, timeout: float = 60) -> dict:
        """The job once it has finished (any end state)."""
        with self.client() as c:

            def finished() -> dict | None:
                job: dict = c.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] in FINISHED else None

            return eventually(finished, timeout=timeout, message=f"job {job_id} finished")


#: jobs that block a worker until their test ends (tests/integration/conftest.py cancels them)
blockers: list[tuple[Stack, str]] = []


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


def worker_lanes(env: dict[str, str]) -> list[str]:
    """The lanes a worker started with `env` consumes: its model's (core.lanes)."""
    return Settings().lanes(env.get("INFERQ_SERVED_MODEL_NAME") or "tiny")


def wait_ready(base_url: str, timeout: float = 120, headers: dict[str, str] | None = None) -> None:
    def ok() -> bool:
        return httpx.get(f"{base_url}/ready", timeout=2, headers=headers).status_code == 200

    eventually(ok, timeout=timeout, interval=0.25, message="stack /ready")


def start_stack(env: dict[str, str], home: Path, ready_headers: dict[str, str] | None = None) -> Stack:
    log = home / "stack.log"
    sup = supervisor()
    api_port, flower_port = free_port(), free_port()
    with log.open("wb") as fh:
        sup.start(
            "worker",
            worker_argv(worker_lanes(env)),
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
