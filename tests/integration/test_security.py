"""Access control on a stack with API keys: keys required, objects owned by the key that
made them, per-key rate and active-job limits; Celery refuses pickled messages; `inferq run`
refuses to expose an unauthenticated server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from kombu import Connection, Exchange, Producer

from cli.processes import free_port
from core.auth import hash_key
from core.job_store import JobStore
from schemas.openai import ChatCompletionRequest
from tests.support import ROOT, procs
from tests.support.stack import Stack, cli_env, stack_env, start_stack, with_db
from tests.support.wait import eventually
from workers.engines.echo import SLOW_TRIGGER

K1, K2, K_RATE, K_ACTIVE = "key-one", "key-two", "key-rate", "key-active"


@pytest.fixture(scope="module")
def secure(redis_url: str, demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    url = with_db(redis_url, 13)
    redis.Redis.from_url(url).flushdb()
    home = tmp_path_factory.mktemp("secure-home")
    keys_env = json.dumps([K1, f"sha256:{hash_key(K2)}", K_RATE, K_ACTIVE])  # hashes work as well as keys
    env = stack_env(
        url,
        demo_model,
        home,
        INFERQ_ENGINE="echo",
        INFERQ_API_KEYS=keys_env,
        INFERQ_RATE_LIMIT_PER_MINUTE="40",
        INFERQ_MAX_ACTIVE_PER_KEY="4",
    )
    st = start_stack(env, home, ready_headers={"Authorization": f"Bearer {K1}"})
    yield st
    st.sup.stop_all()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _job_body(content: str = "hello") -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}]}


def test_keys_are_required_everywhere_but_health(secure: Stack) -> None:
    with httpx.Client(base_url=secure.base_url) as c:
        assert c.get("/health").status_code == 200
        for method, path in [
            ("GET", "/ready"),
            ("GET", "/v1/models"),
            ("POST", "/v1/jobs"),
            ("GET", "/v1/files"),
            ("GET", "/v1/batches"),
            ("GET", "/v1/jobs/job_x"),
        ]:
            resp = c.request(method, path, json=_job_body() if method == "POST" else None)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.json()["error"]["code"] == "missing_api_key"
        # loading adapters needs an admin key, which an ordinary key is not
        load = {"lora_name": "x", "lora_path": "/tmp/x"}
        refused = c.post("/v1/load_lora_adapter", json=load, headers=_h(K1))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
        bad = c.post("/v1/jobs", json=_job_body(), headers=_h("nope"))
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers=_h(K2)).status_code == 200  # configured by hash only


def test_objects_belong_to_their_key(secure: Stack) -> None:
    with httpx.Client(base_url=secure.base_url, timeout=30) as c:
        job = c.post("/v1/jobs", json=_job_body(), headers=_h(K1)).json()
        assert c.get(f"/v1/jobs/{job['id']}", headers=_h(K1)).status_code == 200
        other = c.get(f"/v1/jobs/{job['id']}", headers=_h(K2))
        assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
        assert c.post(f"/v1/jobs/{job['id']}/cancel", headers=_h(K2)).status_code == 404
        assert c.get(f"/v1/jobs/{job['id']}/events", headers=_h(K2)).status_code == 404
        line = json.dumps(
            {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": _job_body()}
        )
        f = c.post(
            "/v1/files",
            files={"file": ("a.jsonl", io.BytesIO(line.encode()))},
            data={"purpose": "batch"},
            headers=_h(K1),
        ).json()
        assert c.get(f"/v1/files/{f['id']}", headers=_h(K2)).status_code == 404
        assert c.get(f"/v1/files/{f['id']}/content", headers=_h(K2)).status_code == 404
        assert f["id"] not in [x["id"] for x in c.get("/v1/files", headers=_h(K2)).json()["data"]]
        assert (
            c.post(
                "/v1/batches",
                headers=_h(K2),
                json={
                    "input_file_id": f["id"],
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            ).status_code
            == 404
        )
        b = c.post(
            "/v1/batches",
            headers=_h(K1),
            json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ).json()
        assert c.get(f"/v1/batches/{b['id']}", headers=_h(K2)).status_code == 404
        assert b["id"] not in [x["id"] for x in c.get("/v1/batches", headers=_h(K2)).json()["data"]]
        # listing: each key sees its own jobs only, and another key's batch is not found
        mine = [x["id"] for x in c.get("/v1/jobs", params={"limit": 100}, headers=_h(K1)).json()["data"]]
        theirs = [x["id"] for x in c.get("/v1/jobs", params={"limit": 100}, headers=_h(K2)).json()["data"]]
        assert job["id"] in mine and job["id"] not in theirs
        assert c.get("/v1/jobs", params={"batch_id": b["id"]}, headers=_h(K2)).status_code == 404
        lines = eventually(
            lambda: c.get("/v1/jobs", params={"batch_id": b["id"]}, headers=_h(K1)).json()["data"],
            timeout=60,
            interval=0.1,
            message="the batch's line listed as a job",
        )
        assert [x["batch_id"] for x in lines] == [b["id"]]  # its one line
        assert c.delete(f"/v1/files/{f['id']}", headers=_h(K2)).status_code == 404


def test_responses_and_webhooks_belong_to_their_key(secure: Stack) -> None:
    """A response is its key's as its job is; a webhook endpoint is its key's: another key
    neither sees, cancels, deletes nor continues them."""
    with httpx.Client(base_url=secure.base_url, timeout=30) as c:
        created = c.post(
            "/v1/responses", json={"model": "tiny", "input": "hi", "background": True}, headers=_h(K1)
        )
        rid = created.json()["id"]
        assert c.get(f"/v1/responses/{rid}", headers=_h(K1)).status_code == 200
        for method, path in (
            ("GET", f"/v1/responses/{rid}"),
            ("POST", f"/v1/responses/{rid}/cancel"),
            ("DELETE", f"/v1/responses/{rid}"),
            ("GET", f"/v1/responses/{rid}/input_items"),
        ):
            other = c.request(method, path, headers=_h(K2))
            assert other.status_code == 404 and other.json()["error"]["code"] == "response_not_found", path
        follow = c.post(
            "/v1/responses",
            json={"model": "tiny", "input": "more", "previous_response_id": rid},
            headers=_h(K2),
        )
        assert follow.status_code == 404 and follow.json()["error"]["param"] == "previous_response_id"
        # a public address (no DNS needed), for an event this test never causes
        body = {"url": "https://93.184.215.14/hook", "events": ["batch.expired"]}
        hook = c.post("/v1/webhooks", json=body, headers=_h(K1))
        assert hook.status_code in (200, 201), hook.text
        assert [e["id"] for e in c.get("/v1/webhooks", headers=_h(K1)).json()["data"]] == [hook.json()["id"]]
        assert c.get("/v1/webhooks", headers=_h(K2)).json()["data"] == []
        assert c.delete(f"/v1/webhooks/{hook.json()['id']}", headers=_h(K2)).status_code == 404
        assert c.delete(f"/v1/webhooks/{hook.json()['id']}", headers=_h(K1)).status_code == 200


def test_an_idempotency_key_is_per_api_key(secure: Stack) -> None:
    """Two keys that happen to pick the same Idempotency-Key get their own jobs."""
    with httpx.Client(base_url=secure.base_url, timeout=30) as c:
        same = {"Idempotency-Key": "order-42"}
        a = c.post("/v1/jobs", json=_job_body(), headers={**_h(K1), **same})
        b = c.post("/v1/jobs", json=_job_body(), headers={**_h(K2), **same})
        again = c.post("/v1/jobs", json=_job_body(), headers={**_h(K1), **same})
    assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]
    assert "idempotent-replayed" not in b.headers
    assert again.json()["id"] == a.json()["id"] and again.headers["idempotent-replayed"] == "true"


def test_keys_from_the_cli_work(secure: Stack) -> None:
    proc = procs.run(
        [sys.executable, "-m", "cli.main", "keys", "create", "alice", "--redis-url", secure.redis_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip().splitlines()[-1]
    assert key.startswith("iq-")
    stored = [k for k in redis.Redis.from_url(secure.redis_url).scan_iter(match="inferq:apikey:*")]
    assert stored and key.encode() not in b"".join(stored)  # only the hash is kept
    assert httpx.post(f"{secure.base_url}/v1/jobs", json=_job_body(), headers=_h(key)).status_code == 202


def test_rate_limit_answers_429_with_retry_after(secure: Stack) -> None:
    with httpx.Client(base_url=secure.base_url) as c:
        codes = [c.get("/v1/models", headers=_h(K_RATE)).status_code for _ in range(45)]
    assert codes[:38].count(200) == 38 and codes[-1] == 429
    with httpx.Client(base_url=secure.base_url) as c:
        resp = c.get("/v1/models", headers=_h(K_RATE))
    assert resp.status_code == 429 and 1 <= int(resp.headers["Retry-After"]) <= 60
    assert resp.json()["error"]["type"] == "rate_limit_error"


def test_active_jobs_per_key_are_capped_and_batches_count_their_lines(secure: Stack) -> None:
    with httpx.Client(base_url=secure.base_url, timeout=30) as c:
        ids = [
            c.post("/v1/jobs", json=_job_body(SLOW_TRIGGER), headers=_h(K_ACTIVE)).json()["id"]
            for _ in range(4)
        ]
        over = c.post("/v1/jobs", json=_job_body(), headers=_h(K_ACTIVE))
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_active_jobs"
        assert (
            c.post("/v1/jobs", json=_job_body(), headers=_h(K1)).status_code == 202
        )  # other keys unaffected
        eventually(
            lambda: all(
                c.get(f"/v1/jobs/{j}", headers=_h(K_ACTIVE)).json()["status"] == "succeeded" for j in ids
            ),
            timeout=30,
            interval=1,  # gently: this key is rate limited too
            message="the four slow jobs succeeded",
        )
        lines = "\n".join(
            json.dumps(
                {"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions", "body": _job_body()}
            )
            for i in range(5)
        )
        f = c.post(
            "/v1/files",
            files={"file": ("l.jsonl", io.BytesIO(lines.encode()))},
            data={"purpose": "batch"},
            headers=_h(K_ACTIVE),
        ).json()
        big = c.post(
            "/v1/batches",
            headers=_h(K_ACTIVE),
            json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        )
        assert big.status_code == 429  # 5 lines > 4 allowed
        assert c.post("/v1/jobs", json=_job_body(), headers=_h(K_ACTIVE)).status_code == 202  # freed again


def test_celery_refuses_pickled_messages(echo_stack: Stack) -> None:
    store = JobStore(redis.Redis.from_url(echo_stack.redis_url, decode_responses=True), ttl=600)
    req = ChatCompletionRequest.model_validate(_job_body("pickled") | {"max_tokens": 4})
    job_id = store.create(req, "inferq.jobs@tiny", 3)  # a record, but no JSON message for it
    with Connection(echo_stack.redis_url) as conn:
        producer = Producer(conn.channel())
        producer.publish(  # what an attacker who reached the broker would send
            {"task": "inferq.run_job", "id": job_id, "args": [job_id], "kwargs": {}},
            serializer="pickle",
            exchange=Exchange("inferq.jobs@tiny", type="direct"),
            routing_key="inferq.jobs@tiny",
            headers={"task": "inferq.run_job", "id": job_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""},
        )
    time.sleep(3)  # time passing is the point: long enough to have run it, had it been accepted
    rec = store.get(job_id)
    assert rec is not None and rec.status.value == "queued"  # the worker refused to run it
    assert "pickle" in echo_stack.log.read_text(errors="replace").lower()


def test_run_refuses_to_expose_an_open_server(tmp_path: Path) -> None:
    env = cli_env(INFERQ_HOME=str(tmp_path))
    proc = procs.run(
        [sys.executable, "-m", "cli.main", "run", "--host", "0.0.0.0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--insecure" in proc.stderr


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return procs.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_batch_cli_with_keys_and_clear_errors(secure: Stack, tmp_path: Path) -> None:
    lines = tmp_path / "in.jsonl"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}]}
    lines.write_text(
        "\n".join(
            json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
            for i in range(2)
        )
        + "\nnot json\n"
    )
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    done = _cli(
        "--url", secure.base_url, "--api-key", K1, "batch", "submit", str(lines), "--wait",
        "--output", str(out), "--errors", str(err), "--allow-failed", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # the bad line is accepted with --allow-failed
    batch = json.loads(done.stdout.strip().splitlines()[-1])
    assert batch["status"] == "completed" and batch["request_counts"] == {
        "total": 3,
        "completed": 2,
        "failed": 1,
    }
    # the dispatcher finalizes for no key, yet the files are the key's: once it could not
    # read the batch it was finalizing, so --wait never ended; then the key got 404 for them
    assert sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines()) == ["c0", "c1"]
    assert "line 3" in err.read_text()
    for file_id in (batch["output_file_id"], batch["error_file_id"]):
        assert httpx.get(f"{secure.base_url}/v1/files/{file_id}/content", headers=_h(K1)).status_code == 200
        assert httpx.get(f"{secure.base_url}/v1/files/{file_id}/content", headers=_h(K2)).status_code == 404
    # the key from the environment, --url after the subcommand
    status = _cli("batch", "status", batch["id"], "--url", secure.base_url, "--json", INFERQ_API_KEY=K1)
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == batch["id"], status.stderr
    for failed, needle in (
        (_cli("batch", "status", batch["id"], "--url", secure.base_url), "error 401"),
        (_cli("batch", "status", "batch_nope", "--url", secure.base_url, INFERQ_API_KEY=K1), "error 404"),
        (_cli("batch", "submit", str(tmp_path / "missing.jsonl"), "--url", secure.base_url), "no such file"),
        (
            _cli("batch", "--url", f"http://127.0.0.1:{free_port()}", "status", "b"),
            "cannot reach the inferq API",
        ),
    ):
        text = failed.stdout + failed.stderr
        assert failed.returncode == 1 and needle in text and "Traceback" not in text, text
        assert len(text.strip().splitlines()) == 1, text
