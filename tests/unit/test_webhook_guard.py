"""The SSRF rule of webhook URLs (api.webhook_guard): which addresses a delivery may reach,
IPv4 and IPv6, and what the allow list opens (names, addresses, CIDR networks)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from api.webhook_guard import AllowList, Refused, address_refusal, check, split_url

NONE = AllowList.parse([])


@pytest.mark.parametrize(
    ("addr", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not a globally routable"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "cloud metadata"),
    ],
)
def test_internal_addresses_are_refused(addr: str, kind: str) -> None:
    why = address_refusal(ipaddress.ip_address(addr), NONE)
    assert why is not None and kind in why, why


@pytest.mark.parametrize("addr", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(addr: str) -> None:
    assert address_refusal(ipaddress.ip_address(addr), NONE) is None


def test_allow_list_opens_addresses_networks_and_names() -> None:
    allow = AllowList.parse(["127.0.0.1", "10.0.0.0/8", "fd00::/8", "Hooks.Internal.", "[::1]"])
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), allow) is None
    assert address_refusal(ipaddress.ip_address("127.0.0.2"), allow) is not None  # only that address
    assert address_refusal(ipaddress.ip_address("10.200.3.4"), allow) is None
    assert address_refusal(ipaddress.ip_address("11.0.0.1"), allow) is None  # public anyway
    assert address_refusal(ipaddress.ip_address("172.16.0.1"), allow) is not None
    assert address_refusal(ipaddress.ip_address("fd00:ec2::254"), allow) is None  # listed network
    assert address_refusal(ipaddress.ip_address("::1"), allow) is None
    assert address_refusal(ipaddress.ip_address("169.254.169.254"), allow) is not None
    assert allow.allows_name("hooks.internal") and not allow.allows_name("other.internal")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/x", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http:///nohost", "no host"),
        ("https://user:pw@example.com/", "credentials"),
        ("http://example.com:99999/", "not a valid URL"),
    ],
)
def test_url_shape(url: str, reason: str) -> None:
    with pytest.raises(Refused, match=reason):
        split_url(url)


def test_check_resolves_and_names_the_reason() -> None:
    with pytest.raises(Refused, match=r"localhost resolves to .*loopback"):
        asyncio.run(check("http://localhost:8080/hook", NONE, 5))
    with pytest.raises(Refused, match=r"169\.254\.169\.254 is a cloud metadata address"):
        asyncio.run(check("http://169.254.169.254/latest/meta-data", NONE, 5))
    with pytest.raises(Refused, match="loopback"):
        asyncio.run(check("http://[::1]:9/", NONE, 5))
    parts, addrs = asyncio.run(check("http://127.0.0.1:9/x", AllowList.parse(["127.0.0.0/8"]), 5))
    assert parts.port == 9 and addrs == [ipaddress.ip_address("127.0.0.1")]
    _, addrs = asyncio.run(check("http://localhost:9/x", AllowList.parse(["localhost"]), 5))
    assert addrs and all(a.is_loopback for a in addrs)


async def test_a_delivery_to_a_refused_address_is_a_refused_attempt() -> None:
    """The check at delivery (api.webhooks.WebhookDispatcher.post): nothing is sent."""
    import redis.asyncio as aredis

    from api.webhooks import WebhookDispatcher
    from core.config import Settings
    from core.webhooks import Endpoint, new_secret

    raw = {"event_id": "evt_1", "body": "{}"}
    unused = aredis.Redis.from_url("redis://127.0.0.1:1")  # never connected to
    for allow, outcome, error in (
        (["10.0.0.0/8"], "refused", "refused: "),
        (["127.0.0.1"], "failed", "Connect"),
    ):
        settings = Settings(redis_url="redis://x", webhook_allow_hosts=allow, webhook_timeout_s=2)
        dispatcher = WebhookDispatcher(unused, unused, settings)
        ep = Endpoint(id="we_1", url="http://127.0.0.1:9/hook", events=[], secret=new_secret())
        attempt, got = await dispatcher.post(ep, raw)
        await dispatcher.http.aclose()
        assert got == outcome and attempt.status_code is None, attempt
        assert attempt.error and attempt.error.startswith(error), attempt
    await unused.aclose()
