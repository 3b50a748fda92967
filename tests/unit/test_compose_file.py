"""No Docker engine here: check the compose file's structure instead of running it."""

from typing import Any

import yaml

from cli.processes import worker_argv
from core.config import Settings
from tests.support import ROOT


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_healthchecks() -> None:
    services = _compose()["services"]
    assert set(services) == {"valkey", "api", "worker", "flower"}
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"


def test_valkey_is_persistent_and_internal() -> None:
    data = _compose()
    valkey = data["services"]["valkey"]
    cmd = " ".join(valkey["command"])
    assert "--appendonly yes" in cmd
    assert "ports" not in valkey
    assert valkey["volumes"] and valkey["networks"] == ["backend"]
    assert data["networks"]["backend"]["internal"] is True


def test_worker_reserves_a_gpu_and_runs_prefork_one() -> None:
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert worker["command"][:2] == ["inferq", "worker"]  # the checks, then Celery as below
    cmd = worker_argv(Settings().queues)
    assert cmd[cmd.index("--pool") + 1] == "prefork" and cmd[cmd.index("--concurrency") + 1] == "1"


def test_config_is_env_driven() -> None:
    services = _compose()["services"]
    for name in ("api", "worker", "flower"):
        env = services[name]["environment"]
        assert env["INFERQ_REDIS_URL"] == "redis://valkey:6379/0"
        assert env["INFERQ_MODEL_PATH"].startswith("${INFERQ_MODEL_PATH:?")
        assert env["INFERQ_API_KEYS"].startswith("${INFERQ_API_KEYS:?")  # a published API needs keys
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")


def test_batch_files_live_on_a_named_volume_for_every_service_that_uses_them() -> None:
    """Recreating the API container must not lose uploads and batch output files while the
    batch records survive in Valkey."""
    data = _compose()
    assert "inferq-files" in data["volumes"]
    api = data["services"]["api"]  # the one service that reads or writes them
    assert api["environment"]["INFERQ_FILES_DIR"] == "/data/files"
    assert "inferq-files:/data/files" in api["volumes"]
