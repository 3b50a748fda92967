"""Where a webhook may be sent: no server-side request forgery.

Why twice: a tenant who names `http://169.254.169.254/...` (cloud metadata, credentials) or
an internal service as its webhook URL would make inferq fetch it from inside the network.
So an endpoint's URL is checked when it is made (a 400 naming `url`), and again at every
delivery after its name is resolved: DNS may answer differently later (rebinding), so the
request then goes to the very address that was checked, not to a second lookup.

Refused by default: loopback, private, link-local, shared (CGNAT), unspecified, multicast,
reserved and other not globally routable addresses, and the metadata addresses by name.
`webhook_allow_hosts` lists host names, addresses or networks (CIDR) that an on-premise
deployment does want reached."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: cloud metadata services (AWS, GCP, Azure, OpenStack: 169.254.169.254; AWS over IPv6;
#: Alibaba Cloud; Oracle's second address)
METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_KINDS: tuple[tuple[str, str], ...] = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_reserved", "reserved"),
    ("is_private", "private"),
)


class Refused(Exception):
    """A URL or address a webhook may not go to; the message says why (for the 400, or the
    delivery's failed attempt)."""


@dataclass(frozen=True)
class AllowList:
    names: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = field(default_factory=tuple)

    @classmethod
    def parse(cls, entries: list[str]) -> AllowList:
        """Host names, addresses and CIDR networks (an address is a /32 or /128)."""
        names, networks = set(), []
        for entry in entries:
            text = entry.strip().lower().strip("[]")
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                names.add(text.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    def allows_name(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def allows(self, addr: IPAddress) -> bool:
        return any(addr.version == net.version and addr in net for net in self.networks)


def address_refusal(addr: IPAddress, allow: AllowList) -> str | None:
    """Why a webhook may not reach `addr` (None: it may)."""
    if allow.allows(addr):
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        inner = address_refusal(addr.ipv4_mapped, allow)
        return f"{inner} (IPv4-mapped)" if inner else None
    if addr in METADATA:
        return f"{addr} is a cloud metadata address"
    for attr, kind in _KINDS:
        if getattr(addr, attr):
            return f"{addr} is a {kind} address"
    if not addr.is_global:
        return f"{addr} is not a globally routable address"
    return None


def split_url(url: str) -> SplitResult:
    """The URL's parts, if it may be a webhook URL at all: http or https, a host, no
    credentials; else Refused."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a port out of range
    except ValueError as exc:
        raise Refused(f"not a valid URL ({exc})") from exc
    if parts.scheme not in ("http", "https"):
        raise Refused("only http and https URLs are allowed")
    if not parts.hostname:
        raise Refused("the URL has no host")
    if parts.username or parts.password:
        raise Refused("the URL may not carry credentials")
    return parts


async def resolve(host: str, port: int, timeout: float) -> list[IPAddress]:
    """Every address `host` resolves to (an address literal is itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), timeout
        )
    except (OSError, TimeoutError) as exc:
        raise Refused(f"the host {host!r} does not resolve ({exc or 'timeout'})") from exc
    out: list[IPAddress] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if addr not in out:
            out.append(addr)
    return out


async def check(url: str, allow: AllowList, timeout: float) -> tuple[SplitResult, list[IPAddress]]:
    """The URL's parts and the addresses a delivery may connect to; Refused if the URL is
    not allowed or any address it resolves to is refused (a name with one internal address
    among public ones could be steered to it)."""
    parts = split_url(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addrs = await resolve(host, port, timeout)
    if allow.allows_name(host):
        return parts, addrs
    for addr in addrs:
        if why := address_refusal(addr, allow):
            named = "" if host.strip("[]") == str(addr) else f"{host} resolves to "
            raise Refused(
                f"{named}{why}; webhooks may not reach internal addresses "
                "(INFERQ_WEBHOOK_ALLOW_HOSTS lists hosts that may be reached)"
            )
    return parts, addrs
