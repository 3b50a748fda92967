"""Which event an object's end is (schemas.webhooks.event_type), the thin payload, the
retry schedule and the rotation's two signatures (api.webhooks), without a server."""

from __future__ import annotations

import json

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from api.webhooks import next_attempt, sign_headers
from core.config import Settings
from core.webhooks import Endpoint, delivery_id, event_id, new_secret
from schemas.webhooks import EVENT_TYPES, event_body, event_type, object_id


def _result(finish: str) -> str:
    return json.dumps({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": finish}]})


@pytest.mark.parametrize(
    ("kind", "status", "result", "expected"),
    [
        ("job", "succeeded", None, "job.succeeded"),
        ("job", "failed", None, "job.failed"),
        ("job", "cancelled", None, "job.cancelled"),
        ("job", "expired", None, "job.expired"),
        ("response", "succeeded", _result("stop"), "response.completed"),
        ("response", "succeeded", _result("tool_calls"), "response.completed"),
        ("response", "succeeded", _result("length"), "response.incomplete"),
        ("response", "succeeded", None, "response.completed"),
        ("response", "succeeded", "not json", "response.completed"),
        ("response", "failed", None, "response.failed"),
        ("response", "expired", None, "response.failed"),
        ("response", "cancelled", None, "response.cancelled"),
        ("batch", "completed", None, "batch.completed"),
        ("batch", "failed", None, "batch.failed"),
        ("batch", "expired", None, "batch.expired"),
        ("batch", "cancelled", None, "batch.cancelled"),
        ("job", "running", None, None),
        ("batch", "finalizing", None, None),
        ("chat", "succeeded", None, None),
    ],
)
def test_event_type(kind: str, status: str, result: str | None, expected: str | None) -> None:
    assert event_type(kind, status, result) == expected


def test_every_event_type_is_reachable() -> None:
    ends = {
        "job": ["succeeded", "failed", "cancelled", "expired"],
        "batch": ["completed", "failed", "expired", "cancelled"],
        "response": ["succeeded", "failed", "cancelled"],
    }
    seen = {event_type(k, s) for k, statuses in ends.items() for s in statuses}
    seen.add(event_type("response", "succeeded", _result("length")))
    assert seen == set(EVENT_TYPES)


def test_thin_payload_and_ids() -> None:
    assert object_id("response", "job_abc") == "resp_abc"
    assert object_id("job", "job_abc") == "job_abc"
    body = json.loads(event_body("evt_1", "job.succeeded", 1700000000, "job_abc"))
    assert body == {
        "id": "evt_1",
        "object": "event",
        "type": "job.succeeded",
        "created_at": 1700000000,
        "data": {"id": "job_abc"},
    }
    assert event_id("1-0") == event_id("1-0") != event_id("1-1")
    assert event_id("1-0").startswith("evt_")
    assert delivery_id("evt_a", "we_1") == delivery_id("evt_a", "we_1") != delivery_id("evt_a", "we_2")


def test_retry_schedule() -> None:
    settings = Settings(redis_url="redis://x", webhook_retry_s=[0.5, 1.0, 2.0])
    assert next_attempt(settings, 1, 100.0) == 100.5
    assert next_attempt(settings, 3, 100.0) == 102.0
    assert next_attempt(settings, 4, 100.0) is None
    assert len(Settings(redis_url="redis://x").webhook_retry_s) == 9


def test_rotation_signs_with_both_secrets_during_the_overlap() -> None:
    old, new = new_secret(), new_secret()
    ep = Endpoint(id="we_1", url="https://example.com", events=[], secret=new, old_secret=old)
    now = 1_000_000.0
    body = event_body("evt_1", "job.succeeded", 1, "job_1")
    ep.old_secret_until = now + 60
    headers = sign_headers(ep, "evt_1", body, now)
    assert headers["webhook-id"] == "evt_1" and headers["webhook-timestamp"] == str(int(now))
    sigs = headers["webhook-signature"].split(" ")
    assert len(sigs) == 2 and all(s.startswith("v1,") for s in sigs)
    ep.old_secret_until = now - 1
    assert len(sign_headers(ep, "evt_1", body, now)["webhook-signature"].split(" ")) == 1


def test_signature_verifies_with_standardwebhooks() -> None:
    import time

    secret = new_secret()
    ep = Endpoint(id="we_1", url="https://example.com", events=[], secret=secret)
    body = event_body("evt_2", "batch.completed", 1, "batch_1")
    headers = sign_headers(ep, "evt_2", body, time.time())
    assert Webhook(secret).verify(body, headers)["data"] == {"id": "batch_1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


def test_endpoint_hears() -> None:
    mine = Endpoint(id="we_1", url="u", events=["job.succeeded"], owner="key_a")
    assert mine.hears("key_a", "job.succeeded")
    assert not mine.hears("key_b", "job.succeeded")
    assert not mine.hears("key_a", "job.failed")
    every = Endpoint(id="we_2", url="u", events=[], owner="key_a", all_keys=True)
    assert every.hears("key_b", "batch.failed")


def test_who_manages_which_endpoint() -> None:
    from api.routes.webhooks import Caller

    a = Endpoint(id="we_a", url="u", events=[], owner="key_a")
    configured = Endpoint(id="we_cfg_x", url="u", events=[], source="settings")
    assert Caller("key_a", False).may(a)
    assert not Caller("key_b", False).may(a)
    assert not Caller("key_a", False).may(configured)
    assert Caller("key_b", True).may(a) and Caller("", True).may(configured)
