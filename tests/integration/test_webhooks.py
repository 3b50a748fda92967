"""Signed webhooks end to end: a real receiver on loopback (allowed on `extras_stack`) that
verifies every Standard Webhooks signature, fails its first tries, and sees the retries;
jobs and batches announced; an API restart loses no pending event; rotation; the SSRF
refusals on a default stack; the counters in /metrics."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
from standardwebhooks import Webhook, WebhookVerificationError

from core import keys
from tests.support.stack import Stack, wait_ready
from tests.support.wait import eventually


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int
    #: which of the receiver's secrets verified the delivery on its own
    verified_by: list[str]

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.body)
        return event


@dataclass
class Receiver:
    """An HTTP receiver in a thread: answers 500 to the first `fail_first` tries of each
    webhook-id, then 200; records every request and which secrets verify it."""

    secrets: list[str] = field(default_factory=list)
    fail_first: int = 0
    got: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        verified = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
                verified.append(secret)
            except WebhookVerificationError:
                pass
        with self.lock:
            tries = sum(1 for r in self.got if r.headers.get("webhook-id") == headers.get("webhook-id"))
            status = 500 if tries < self.fail_first else 200
            self.got.append(Received(headers, body, status, verified))
        return status

    def about(self, data_id: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.event["data"]["id"] == data_id]


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = rec.handle({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    rec.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=rec.server.serve_forever, daemon=True)
    thread.start()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()


@pytest.fixture()
def endpoints(extras_stack: Stack) -> Iterator[list[str]]:
    """Endpoint ids a test made; deleted after it, so later tests' objects do not reach it."""
    made: list[str] = []
    yield made
    for endpoint_id in made:
        httpx.delete(f"{extras_stack.base_url}/v1/webhooks/{endpoint_id}", timeout=30)


def _create(stack: Stack, made: list[str], url: str, events: list[str]) -> dict[str, Any]:
    resp = httpx.post(f"{stack.base_url}/v1/webhooks", json={"url": url, "events": events}, timeout=30)
    assert resp.status_code == 200, resp.text
    endpoint: dict[str, Any] = resp.json()
    made.append(endpoint["id"])
    assert endpoint["secret"].startswith("whsec_") and endpoint["events"] == events
    return endpoint


def _counter(stack: Stack, name: str, label: str) -> float:
    text = httpx.get(f"{stack.base_url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(f"{name}_total{{{label}}}"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{label}}} not in /metrics")


def _deliveries(stack: Stack, endpoint_id: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{stack.base_url}/v1/webhooks/{endpoint_id}/deliveries", timeout=30)
    assert resp.status_code == 200, resp.text
    data: list[dict[str, Any]] = resp.json()["data"]
    return data


def test_job_event_retried_until_delivered_signed_and_counted(
    extras_stack: Stack, receiver: Receiver, endpoints: list[str]
) -> None:
    receiver.fail_first = 2
    endpoint = _create(extras_stack, endpoints, receiver.url, ["job.succeeded"])
    receiver.secrets = [endpoint["secret"]]
    failed_before = _counter(extras_stack, "inferq_webhook_attempts", 'outcome="failed"')
    ok_before = _counter(extras_stack, "inferq_webhook_attempts", 'outcome="succeeded"')

    job = extras_stack.submit("hello hook", max_tokens=4)
    assert extras_stack.wait_job(job)["status"] == "succeeded"

    def three_tries() -> list[Received] | None:
        tries = receiver.about(job)
        return tries if len(tries) >= 3 else None

    got = eventually(three_tries, timeout=30, message="3 tries")

    assert [r.status for r in got] == [500, 500, 200]
    assert len({r.headers["webhook-id"] for r in got}) == 1, "the same webhook-id on every retry"
    assert all(r.verified_by == [endpoint["secret"]] for r in got)
    event = got[0].event
    assert event["id"] == got[0].headers["webhook-id"] and event["id"].startswith("evt_")
    assert event["object"] == "event" and event["type"] == "job.succeeded"
    assert event["data"] == {"id": job} and isinstance(event["created_at"], int)
    assert {r.body for r in got} == {got[0].body}

    def delivered() -> dict[str, Any] | None:
        mine = [d for d in _deliveries(extras_stack, endpoint["id"]) if d["data_id"] == job]
        return mine[0] if mine and mine[0]["status"] == "delivered" else None

    delivery = eventually(delivered, timeout=10, message="delivery listed as delivered")
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    assert delivery["event_id"] == event["id"] and delivery["event_type"] == "job.succeeded"
    assert delivery["attempts"][0]["error"] == "HTTP 500"
    assert _counter(extras_stack, "inferq_webhook_attempts", 'outcome="failed"') >= failed_before + 2
    assert _counter(extras_stack, "inferq_webhook_attempts", 'outcome="succeeded"') >= ok_before + 1
    assert _counter(extras_stack, "inferq_webhook_deliveries", 'status="delivered"') >= 1


def test_batch_completed(extras_stack: Stack, receiver: Receiver, endpoints: list[str]) -> None:
    endpoint = _create(extras_stack, endpoints, receiver.url, ["batch.completed", "batch.cancelled"])
    receiver.secrets = [endpoint["secret"]]
    lines = [
        json.dumps(
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            }
        )
        for i in range(2)
    ]
    upload = httpx.post(
        f"{extras_stack.base_url}/v1/files",
        files={"file": ("w.jsonl", "\n".join(lines).encode())},
        data={"purpose": "batch"},
        timeout=30,
    )
    assert upload.status_code == 200, upload.text
    body = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    batch = httpx.post(f"{extras_stack.base_url}/v1/batches", json=body, timeout=30).json()["id"]

    got = eventually(lambda: receiver.about(batch), timeout=120, message=f"{batch} announced")
    assert got[0].event["type"] == "batch.completed" and got[0].verified_by == [endpoint["secret"]]
    assert (
        httpx.get(f"{extras_stack.base_url}/v1/batches/{batch}", timeout=30).json()["status"] == "completed"
    )
    assert not [r for r in receiver.got if r.event["type"] not in ("batch.completed", "batch.cancelled")]


def test_an_end_while_the_api_is_down_is_delivered_after_its_restart(
    extras_stack: Stack, receiver: Receiver, endpoints: list[str]
) -> None:
    endpoint = _create(extras_stack, endpoints, receiver.url, ["job.cancelled"])
    receiver.secrets = [endpoint["secret"]]
    # long enough to outlast the API's graceful stop (the model never emits EOS: conftest)
    job = extras_stack.submit("a long one", max_tokens=1900, temperature=0.9)
    extras_stack.wait_running(job)
    r = redis.Redis.from_url(extras_stack.redis_url, decode_responses=True)
    try:
        extras_stack.sup.stop("api")
        try:
            assert r.hget(keys.job(job), "status") == "running", "the job ended before the API did"
            # with the API down, the job ends: its worker sees the cancel flag the API would set
            r.set(keys.cancel(job), "1", ex=3600)
            eventually(
                lambda: r.hget(keys.job(job), "status") == "cancelled",
                timeout=60,
                message=lambda: f"cancelled: {r.hmget(keys.job(job), ['status', 'worker', 'error'])}",
            )
            assert not receiver.about(job), "delivered although no API runs"
        finally:
            extras_stack.sup.restart("api")
            wait_ready(extras_stack.base_url)
    finally:
        r.close()
    got = eventually(lambda: receiver.about(job), timeout=30, message="announced after the restart")
    assert got[0].event["type"] == "job.cancelled" and got[0].verified_by == [endpoint["secret"]]


def test_rotation_signs_with_both_secrets(
    extras_stack: Stack, receiver: Receiver, endpoints: list[str]
) -> None:
    endpoint = _create(extras_stack, endpoints, receiver.url, ["job.succeeded"])
    base = extras_stack.base_url
    rotated = httpx.post(f"{base}/v1/webhooks/{endpoint['id']}/rotate_secret", timeout=30).json()
    old, new = endpoint["secret"], rotated["secret"]
    assert new.startswith("whsec_") and new != old
    shown = httpx.get(f"{base}/v1/webhooks/{endpoint['id']}", timeout=30).json()
    assert "secret" not in shown and shown["url"] == receiver.url
    assert endpoint["id"] in [e["id"] for e in httpx.get(f"{base}/v1/webhooks", timeout=30).json()["data"]]
    receiver.secrets = [old, new]

    job = extras_stack.submit("rotate", max_tokens=4)
    got = eventually(lambda: receiver.about(job), timeout=60, message="delivered after rotation")
    assert len(got[0].headers["webhook-signature"].split(" ")) == 2
    assert got[0].verified_by == [old, new], "each secret alone verifies it"


def test_internal_urls_are_refused_by_default(stack: Stack) -> None:
    cases = {
        "http://127.0.0.1:9/hook": "loopback",
        "http://169.254.169.254/latest/meta-data/": "cloud metadata",
        "http://[fd00:ec2::254]/": "cloud metadata",
        "http://10.0.0.8/": "private",
        "ftp://example.com/": "only http and https",
    }
    for url, reason in cases.items():
        resp = httpx.post(f"{stack.base_url}/v1/webhooks", json={"url": url}, timeout=30)
        assert resp.status_code == 400, (url, resp.text)
        error = resp.json()["error"]
        assert error["param"] == "url" and reason in error["message"], (url, error)
    resp = httpx.post(
        f"{stack.base_url}/v1/webhooks",
        json={"url": "https://example.com/", "events": ["job.done"]},
        timeout=30,
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "events", resp.text
    assert httpx.get(f"{stack.base_url}/v1/webhooks/we_nope/deliveries", timeout=30).status_code == 404


def test_a_response_cut_by_its_token_limit_is_incomplete(
    extras_stack: Stack, receiver: Receiver, endpoints: list[str]
) -> None:
    """The demo model never ends by itself, so a response ends by `max_output_tokens`."""
    endpoint = _create(extras_stack, endpoints, receiver.url, ["response.completed", "response.incomplete"])
    receiver.secrets = [endpoint["secret"]]
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 4}
    resp = httpx.post(f"{extras_stack.base_url}/v1/responses", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    response_id = resp.json()["id"]
    assert response_id.startswith("resp_")
    got = eventually(lambda: receiver.about(response_id), timeout=60, message=f"{response_id} announced")
    assert got[0].event["type"] == "response.incomplete" and got[0].verified_by == [endpoint["secret"]]
