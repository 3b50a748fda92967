"""docker-compose.yml's own commands, environment and healthchecks, run as local processes
(there is no Docker engine here): what its containers would run must serve a job and a
batch, pass their healthchecks, and keep batch files across a recreated API container."""

from __future__ import annotations

import json
import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import yaml

from cli.processes import free_port
from tests.support import ROOT, procs
from tests.support.stack import fresh_db
from tests.support.wait import eventually

KEY = "compose-key"


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _interpolate(raw: str, given: dict[str, str]) -> str:
    """Compose's `${NAME:?message}` (required: KeyError if the test gives none, as compose
    refuses to start) and `${NAME:-default}`."""

    def value(m: re.Match[str]) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3)
        return given[name] if op == ":?" else given.get(name, rest)

    return re.sub(r"\$\{(\w+)(:\?|:-)([^}]*)\}", value, raw)


class Local:
    """What Docker would provide, here: the service names and ports on this machine, the
    volumes as directories."""

    def __init__(self, redis_url: str, files: Path) -> None:
        self.redis_url, self.files = redis_url, files
        self.ports = {8000: free_port(), 5555: free_port()}

    def text(self, raw: str) -> str:
        raw = raw.replace("redis://valkey:6379/0", self.redis_url).replace("/data/files", str(self.files))
        for inside, here in self.ports.items():
            raw = re.sub(rf"(?<![\d.]){inside}(?!\d)", str(here), raw)
        return raw

    def argv(self, command: list[str]) -> list[str]:
        modules = {"python": [], "inferq": ["-m", "cli.main"]}  # the image's console script
        head = [sys.executable, *modules.get(command[0], ["-m", command[0]])]
        return head + [self.text(part) for part in command[1:]]


def _env(service: dict[str, Any], given: dict[str, str], local: Local) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_") and k != "REDIS_URL"}
    env.update({k: local.text(_interpolate(str(v), given)) for k, v in service["environment"].items()})
    return env


def _healthy(service: dict[str, Any], env: dict[str, str], local: Local) -> bool:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    done = procs.run(local.argv(test[1:]), env=env, cwd=ROOT, capture_output=True, timeout=30)
    return done.returncode == 0


def test_the_compose_services_serve_a_job_and_a_batch(
    redis_url: str, demo_model: Path, tmp_path: Path
) -> None:
    compose = _compose()
    services = compose["services"]
    local = Local(fresh_db(redis_url, 3), tmp_path / "inferq-files")
    given = {
        "INFERQ_API_KEYS": json.dumps([KEY]),
        "INFERQ_MODEL_PATH": str(demo_model),
        "INFERQ_MODEL_TYPE": "qwen2",
        "INFERQ_TEMPLATE": "qwen2_5",
        "INFERQ_SERVED_MODEL_NAME": "tiny",
        "FLOWER_BASIC_AUTH": "admin:secret",
    }
    envs = {name: _env(services[name], given, local) for name in ("api", "worker", "flower")}
    sup = procs.supervisor()
    log = (tmp_path / "compose.log").open("wb")
    base = f"http://127.0.0.1:{local.ports[8000]}"
    auth = {"Authorization": f"Bearer {KEY}"}

    def start(name: str) -> None:
        argv = local.argv(services[name]["command"])
        sup.start(name, argv, env=envs[name], cwd=ROOT, stdout=log.fileno())

    try:
        for name in ("worker", "api", "flower"):
            start(name)
        for name in ("api", "worker", "flower"):
            healthy = partial(_healthy, services[name], envs[name], local)
            eventually(healthy, timeout=240, interval=0.1, message=f"{name} healthcheck")
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        job = httpx.post(f"{base}/v1/chat/completions", json=chat, headers=auth, timeout=120)
        assert job.status_code == 200, job.text

        def flower_sees_the_worker() -> bool:
            url = f"http://127.0.0.1:{local.ports[5555]}/api/workers?refresh=1"
            return bool(httpx.get(url, auth=("admin", "secret"), timeout=30).json())

        eventually(flower_sees_the_worker, timeout=60, interval=0.1, message="Flower's worker list")

        line = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": chat}
        upload = httpx.post(
            f"{base}/v1/files",
            files={"file": ("in.jsonl", json.dumps(line).encode())},
            data={"purpose": "batch"},
            headers=auth,
        ).json()
        body = {"input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch = httpx.post(f"{base}/v1/batches", json=body, headers=auth).json()
        batch_url = f"{base}/v1/batches/{batch['id']}"

        def completed() -> dict | None:
            now: dict = httpx.get(batch_url, headers=auth).json()
            return now if now["status"] == "completed" else None

        batch = eventually(
            completed, timeout=120, interval=0.2, message=lambda: httpx.get(batch_url, headers=auth).json()
        )

        # the API container recreated: its files are on the volume, as the batch is in Valkey
        sup.stop("api")
        start("api")
        eventually(
            lambda: _healthy(services["api"], envs["api"], local),
            timeout=120,
            interval=0.1,
            message="api healthcheck",
        )
        out = httpx.get(f"{base}/v1/files/{batch['output_file_id']}/content", headers=auth)
        assert out.status_code == 200 and json.loads(out.text)["custom_id"] == "c1"
    finally:
        sup.stop_all()
        log.close()
