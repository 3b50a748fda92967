"""Start the real stack (Valkey, worker, API) on free ports for a benchmark run."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

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
from core.config import Settings
from models.demo import DEMO_MODEL_TYPE, DEMO_TEMPLATE, build_demo_model

ROOT = Path(__file__).resolve().parent.parent
QUEUES = Settings().lanes("tiny")  # the benches' model, served as "tiny" (core.lanes)


def bench_model(size: str = "tiny", eos_free: bool = True) -> Path:
    """`eos_free`: every request runs to its max_tokens (equal work on both sides); without
    it the random model says EOS at random points (output lengths from 1 to hundreds)."""
    # outside any temp dir: the direct-engine half of a benchmark loads it after the stack stops
    name = f"bench-{size}-eosfree" if eos_free else f"bench-{size}-eos"
    return build_demo_model(Path.home() / ".cache" / "inferq" / name, size=size, eos_free=eos_free)


def bench_settings(model: Path, batch: int, mode: str = "static") -> Settings:
    """The worker's settings for the engine called directly in a benchmark process."""
    return Settings(
        model_path=str(model),
        model_type=DEMO_MODEL_TYPE,
        template=DEMO_TEMPLATE,
        max_batch_size=batch,
        served_model_name="tiny",
        engine_mode=mode,  # type: ignore[arg-type]
    )


@contextmanager
def stack(
    workers: int = 1, size: str = "tiny", flower: bool = False, **env_extra: str
) -> Iterator[tuple[str, Path, dict[str, str], Supervisor]]:
    """Yields (api base URL, model dir, env, supervisor). `flower`: as `inferq run` has it."""
    with tempfile.TemporaryDirectory(prefix="inferq-bench-") as tmp:
        home = Path(tmp)
        model = bench_model(size)
        sup = Supervisor()
        try:
            port = free_port()
            proc = sup.start("valkey", valkey_argv(port, home / "valkey"), stdout=subprocess.DEVNULL)
            wait_for(lambda: port_open(port), 15, "valkey", proc)
            env = dict(os.environ)
            env.update(
                INFERQ_REDIS_URL=f"redis://127.0.0.1:{port}/0",
                INFERQ_MODEL_PATH=str(model),
                INFERQ_MODEL_TYPE=DEMO_MODEL_TYPE,
                INFERQ_TEMPLATE=DEMO_TEMPLATE,
                INFERQ_SERVED_MODEL_NAME="tiny",
                INFERQ_HOME=str(home),
                PYTORCH_NVML_BASED_CUDA_CHECK="1",
                TOKENIZERS_PARALLELISM="false",
                **env_extra,
            )
            log = (home / "stack.log").open("wb")
            for i in range(workers):
                argv = worker_argv(QUEUES, name=f"inferq{i}@%h", loglevel="WARNING")
                sup.start(f"worker{i}", argv, env=env, cwd=ROOT, stdout=log.fileno())
            api_port = free_port()
            sup.start("api", api_argv("127.0.0.1", api_port), env=env, cwd=ROOT, stdout=log.fileno())
            base = f"http://127.0.0.1:{api_port}"
            if flower:
                fport = free_port()
                sup.start("flower", flower_argv("127.0.0.1", fport), env=env, cwd=ROOT, stdout=log.fileno())

            def ready() -> bool:
                if workers == 0:  # the caller starts workers itself, later
                    return httpx.get(f"{base}/health", timeout=2).status_code == 200
                resp = httpx.get(f"{base}/ready", timeout=2)
                return resp.status_code == 200 and len(resp.json()["workers"]) >= workers

            wait_for(ready, 180, "stack", interval=0.25)
            yield base, model, env, sup
        finally:
            sup.stop_all()
