"""LoRA adapters through the whole stack: served by name from INFERQ_ADAPTERS_DIR, mixed with
base jobs in one backlog, dropped in, broken and removed while the worker keeps serving, and
named per line in a /v1/batches batch."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cli.processes import worker_argv
from tests.support import ROOT
from tests.support.stack import Stack, fresh_db, stack_env, start_stack, worker_lanes
from tests.support.wait import eventually
from tests.unit.test_lora_engine import make_adapter


@pytest.fixture(scope="module")
def adapters_root(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapters built once; tests copy them into the served directory."""
    root = tmp_path_factory.mktemp("lora-src")
    for name, seed in (("alpha", 1), ("beta", 2)):
        make_adapter(demo_model, root / name, seed=seed)
    return root


@pytest.fixture(scope="module")
def lora_stack(
    redis_url: str, demo_model: Path, adapters_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Path]]:
    home = tmp_path_factory.mktemp("lora-home")
    served = home / "adapters"
    shutil.copytree(adapters_root / "alpha", served / "alpha")
    env = stack_env(fresh_db(redis_url, 4), demo_model, home, INFERQ_ADAPTERS_DIR=str(served))
    st = start_stack(env, home)
    yield st, served
    st.sup.stop_all()


def _models(stack: Stack) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{stack.base_url}/v1/models", timeout=10).json()["data"]}


def _wait_models(
    stack: Stack, check: Callable[[dict[str, dict]], bool], timeout: float = 10
) -> dict[str, dict]:
    """Until the model list satisfies `check` (the issue's bound: within 10 s)."""

    def satisfied() -> dict[str, dict] | None:
        models = _models(stack)
        return models if check(models) else None

    return eventually(satisfied, timeout=timeout, interval=0.2, message=lambda: _models(stack))


def _text(stack: Stack, model: str, prompt: str) -> str:
    job = stack.submit(prompt, model=model, max_tokens=10, temperature=0)
    done = stack.wait_job(job)
    assert done["status"] == "succeeded", done
    return str(done["result"]["choices"][0]["message"]["content"])


def test_adapters_are_served_by_name_and_share_batches(
    lora_stack: tuple[Stack, Path], adapters_root: Path
) -> None:
    stack, served = lora_stack
    models = _models(stack)
    assert models["alpha"]["parent"] == "tiny" and "parent" not in models["tiny"]
    assert httpx.get(f"{stack.base_url}/v1/models/alpha", timeout=10).json()["parent"] == "tiny"

    # dropped in while the stack runs: served within 10 s, without a restart
    shutil.copytree(adapters_root / "beta", served / "beta")
    _wait_models(stack, lambda m: "beta" in m)

    prompts = ["tell me a story", "what is two plus two", "hello"]
    solo = {(m, p): _text(stack, m, p) for m in ("tiny", "alpha", "beta") for p in prompts}
    assert solo[("alpha", prompts[0])] != solo[("tiny", prompts[0])] != solo[("beta", prompts[0])]

    # one backlog of all three models: every job as it runs alone, batch-mates across adapters
    blocker = stack.submit("hold", max_tokens=300)
    jobs = {
        (m, p): stack.submit(p, model=m, max_tokens=10, temperature=0)
        for p in prompts
        for m in ("tiny", "alpha", "beta")
    }
    stack.wait_job(blocker)
    done = {k: stack.wait_job(j) for k, j in jobs.items()}
    for key, job in done.items():
        assert job["status"] == "succeeded", job
        assert job["result"]["choices"][0]["message"]["content"] == solo[key], key
        assert job["result"]["model"] == key[0]
    assert max(j["engine_rows"] for j in done.values()) > 3  # adapters mixed in one engine call

    # through /v1/batches, each line naming its model
    lines = [
        {
            "custom_id": f"{m}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": m,
                "messages": [{"role": "user", "content": p}],
                "max_tokens": 10,
                "temperature": 0,
            },
        }
        for i, p in enumerate(prompts)
        for m in ("tiny", "beta")
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    with stack.client() as c:
        f = c.post(
            "/v1/files", files={"file": ("l.jsonl", io.BytesIO(data))}, data={"purpose": "batch"}
        ).json()
        body = {"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch = c.post("/v1/batches", json=body).json()
        batch_id = batch["id"]

        def completed() -> dict | None:
            now: dict = c.get(f"/v1/batches/{batch_id}").json()
            assert now["status"] not in ("failed", "cancelled"), now
            return now if now["status"] == "completed" else None

        batch = eventually(
            completed, timeout=120, interval=0.2, message=lambda: c.get(f"/v1/batches/{batch_id}").json()
        )
        out = [json.loads(x) for x in c.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]
    assert len(out) == len(lines)
    for row in out:
        model, i = row["custom_id"].rsplit("-", 1)
        assert row["response"]["body"]["choices"][0]["message"]["content"] == solo[(model, prompts[int(i)])]


def test_broken_and_removed_adapters(lora_stack: tuple[Stack, Path]) -> None:
    stack, served = lora_stack
    broken = served / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    eventually(
        lambda: "adapter 'broken'" in stack.log.read_text(errors="replace"),
        timeout=15,
        interval=0.2,
        message="the refusal is logged, naming the adapter",
    )
    assert "broken" not in _models(stack)
    assert _text(stack, "alpha", "still there?")  # the worker keeps serving
    # a request for it says it was found and refused, and why: not "does not exist"
    error = _refused(stack, "broken")
    assert error["message"].startswith("The adapter 'broken' was found but refused: adapter_config.json")
    # a valid config over weights that are not safetensors: refused when PEFT reads them
    weights = served / "badweights"
    weights.mkdir()
    shutil.copyfile(served / "alpha" / "adapter_config.json", weights / "adapter_config.json")
    (weights / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    assert "badweights" in _refused(stack, "badweights")["message"]
    model = httpx.get(f"{stack.base_url}/v1/models/badweights", timeout=10).json()["error"]
    assert model["code"] == "adapter_refused"
    shutil.rmtree(weights)
    eventually(  # gone from the directory: no longer "refused", simply not there
        lambda: _job_error(stack, "badweights")["code"] == "model_not_found", timeout=10, interval=0.2
    )

    shutil.rmtree(served / "alpha")
    _wait_models(stack, lambda m: "alpha" not in m)
    resp = httpx.post(
        f"{stack.base_url}/v1/jobs",
        json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert resp.json()["error"]["param"] == "model"


def _job_error(stack: Stack, model: str) -> dict:
    resp = httpx.post(
        f"{stack.base_url}/v1/jobs",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert resp.status_code == 404, resp.text
    return dict(resp.json()["error"])


def _refused(stack: Stack, name: str) -> dict:
    """The error a job for the refused adapter `name` gets, once the worker's heartbeat says
    it refused it (within a second or two of the refusal)."""
    error = eventually(
        lambda: (e := _job_error(stack, name))["code"] == "adapter_refused" and e,
        timeout=15,
        interval=0.2,
        message=lambda: _job_error(stack, name),
    )
    assert error["param"] == "model" and f"adapter '{name}' was found but refused: " in error["message"]
    return error


def test_load_and_unload_on_demand(lora_stack: tuple[Stack, Path], adapters_root: Path) -> None:
    """vLLM's endpoints: an adapter from any path the workers can read, served at once."""
    stack, _ = lora_stack
    with stack.client() as c:
        body = {"lora_name": "gamma", "lora_path": str(adapters_root / "beta")}
        loaded = c.post("/v1/load_lora_adapter", json=body)
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["status"] == "loaded"
        assert _models(stack)["gamma"]["parent"] == "tiny"
        assert _text(stack, "gamma", "hello") == _text(stack, "beta", "hello")  # the same weights

        missing = c.post("/v1/load_lora_adapter", json={"lora_name": "delta", "lora_path": "/nonexistent"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path", missing.text
        assert "delta" not in _models(stack)
        bad_name = c.post("/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": "/x"})
        assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "lora_name"

        gone = c.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
        assert gone.status_code == 200 and gone.json()["status"] == "unloaded", gone.text
        job = {"model": "gamma", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/jobs", json=job).status_code == 404
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "nope"}).status_code == 404
    text = httpx.get(f"{stack.base_url}/metrics", timeout=10).text
    assert "inferq_adapter_loads_total{" in text and 'inferq_model_jobs_total{model="gamma"}' in text


def test_a_changed_adapter_serves_new_weights_to_later_jobs(
    lora_stack: tuple[Stack, Path], adapters_root: Path
) -> None:
    """A new checkpoint copied over a served adapter while one of its jobs runs: that job
    ends normally, later jobs get the new weights (here: alpha's, whose output is known). A
    scan that sees the files half-written refuses that version and keeps the old weights."""
    stack, served = lora_stack
    target = served / "swap"
    shutil.copytree(adapters_root / "beta", target)
    _wait_models(stack, lambda m: "swap" in m)
    old = _text(stack, "swap", "tell me a story")
    new = _text(stack, "alpha", "tell me a story") if "alpha" in _models(stack) else None
    if new is None:  # alpha was removed by an earlier test: serve it under another name
        shutil.copytree(adapters_root / "alpha", served / "alpha2")
        _wait_models(stack, lambda m: "alpha2" in m)
        new = _text(stack, "alpha2", "tell me a story")
    assert old != new
    running = stack.submit("a long one", model="swap", max_tokens=400)
    stack.wait_running(running)
    for f in (adapters_root / "alpha").iterdir():
        shutil.copyfile(f, target / f.name)
    assert stack.wait_job(running)["status"] == "succeeded"
    eventually(
        lambda: _text(stack, "swap", "tell me a story") == new,
        timeout=10,
        interval=0.2,
        message="the new weights are served within 10 s",
    )


def test_the_directory_is_the_truth_over_an_unload(
    lora_stack: tuple[Stack, Path], adapters_root: Path
) -> None:
    """An on-demand unload lasts until the directory's entry of that name appears or changes,
    or a worker starts (it used to be kept in Redis for a day and win over the directory,
    across restarts, without a word). Restarts the worker: last in this module."""
    stack, served = lora_stack
    with stack.client() as c:

        def unload(name: str) -> None:
            resp = c.post("/v1/unload_lora_adapter", json={"lora_name": name})
            assert resp.status_code == 200, resp.text
            assert name not in _models(stack)

        # the case: loaded on demand, unloaded; then an adapter of that name copied in
        loaded = c.post(
            "/v1/load_lora_adapter", json={"lora_name": "my-lora", "lora_path": str(adapters_root / "beta")}
        )
        assert loaded.status_code == 200, loaded.text
        unload("my-lora")
        shutil.copytree(adapters_root / "alpha", served / "my-lora")
        _wait_models(stack, lambda m: "my-lora" in m)
        assert _text(stack, "my-lora", "hello")

        # unloaded while in the directory: hidden, with a warning that says so
        unload("my-lora")
        eventually(
            lambda: "adapter 'my-lora' in " in stack.log.read_text(errors="replace"),
            timeout=10,
            interval=0.2,
            message="a warning names the adapter the unload hides",
        )
        hidden = [line for line in stack.log.read_text().splitlines() if "adapter 'my-lora' in " in line]
        assert "WARNING" in hidden[0] and "hidden by an on-demand unload" in hidden[0]
        # ... until its files change (a new checkpoint)
        for f in (adapters_root / "beta").iterdir():
            shutil.copyfile(f, served / "my-lora" / f.name)
        _wait_models(stack, lambda m: "my-lora" in m)

        # ... or until a worker starts (here: Ctrl-C and a new start of the worker)
        unload("my-lora")
    stack.sup.stop("worker")
    with stack.log.open("ab") as log:
        stack.sup.start(
            "worker",
            worker_argv(worker_lanes(stack.env)),
            env=stack.env,
            cwd=ROOT,
            stdout=log.fileno(),
        )
    _wait_models(stack, lambda m: "my-lora" in m, timeout=180)
    assert _text(stack, "my-lora", "hello")
    # routine adapter events are INFO, left out of the default console (WARNING)
    routine = [line for line in stack.log.read_text().splitlines() if "adapter 'my-lora' served from" in line]
    assert routine and all("INFO/" in line for line in routine), routine
