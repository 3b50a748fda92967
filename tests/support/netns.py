"""A small cluster on one machine: Linux network namespaces joined by veth pairs to a bridge.

Why namespaces: "hosts" that only share a network are what makes a partition real. A process
in its own namespace reaches Redis over its veth address and nothing else, so cutting its
link cuts it off as a pulled cable would: its TCP connections stay open and its writes wait
in the kernel, to arrive late when the link comes back (a `kill` or a stopped Redis tests
something else).

Layout: the bridge lives in a namespace of its own (the switch), so the host's firewall
never sees the cluster's traffic (with br_netfilter loaded, a bridge in the root namespace
sends bridged packets through the host's iptables FORWARD chain, which Docker sets to DROP).
Every host gets a namespace, loopback up, and a veth pair: one end in its namespace (`eth0`,
an address on a private /24), the other a port of the switch's bridge. The root namespace
(this test process) gets a port too, with the /24's last address, to reach the hosts'
servers. A cut sets the host's switch port down: the host itself still sees its own link up,
as when the cable is pulled at the switch. (`tc netem loss 100%` would do the same on both
ends, but needs sch_netem, which not every kernel has.)

Names carry this process's pid and a random tag, so parallel runs do not clash; a run killed
before its finalizer leaves namespaces named after a dead pid, which the next run deletes.
Processes are started through the tests' Supervisor (tests/support/procs.py): they die with
the test process, however it ends.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli.processes import Supervisor
from tests.support import procs

#: the private /16 the clusters' /24s are taken from (unlikely to be routed anywhere here)
SUPERNET = "10.231"
#: every namespace this harness makes starts with this, then the owner's pid and a tag
PREFIX = "inferq-"
_OURS = re.compile(rf"^{re.escape(PREFIX)}(\d+)-[0-9a-f]+-")
#: the switch's bridge, and each host's end of its veth pair (names local to a namespace)
BRIDGE = "br0"
HOST_DEV = "eth0"


class NetnsError(RuntimeError):
    """An `ip` command failed: its command line and what it said."""


def ip(*args: str, netns: str | None = None) -> str:
    """`ip [-n NETNS] ARGS`; its stdout. Raises NetnsError with its stderr when it fails."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = procs.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return str(done.stdout)


def try_ip(*args: str, netns: str | None = None) -> bool:
    """`ip` for cleaning up: whether it worked (what is already gone is no error)."""
    try:
        ip(*args, netns=netns)
    except NetnsError:
        return False
    return True


def namespaces() -> set[str]:
    """The named network namespaces (`ip netns list`)."""
    return {line.split(" ", 1)[0] for line in ip("netns", "list").splitlines() if line.strip()}


def _kill_inside(name: str) -> None:
    """SIGKILL what still runs in namespace `name` (a run's leftovers: none, normally)."""
    try:
        pids = ip("netns", "pids", name).split()
    except NetnsError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def namespace_error() -> str | None:
    """Why this machine cannot make network namespaces (None: it can). A probe: make one
    and delete it, as the cluster will."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        ip("netns", "add", name)
    except (NetnsError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    try_ip("netns", "del", name)
    return None


def can_make_namespaces() -> bool:
    return namespace_error() is None


def require_namespaces() -> None:
    """Skip where namespaces cannot be made (not root, no iproute2, a sandbox); in CI (env
    CI=true) fail instead: there they can, and a skipped cluster test would hide that."""
    why = namespace_error()
    if why is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"network namespaces are required in CI: {why}")
    pytest.skip(f"network namespaces unavailable here: {why}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete the namespaces of runs whose process is gone (killed before their finalizer),
    after the processes left in them (which die with their run anyway). Returns their names."""
    swept = []
    for name in sorted(namespaces()):
        m = _OURS.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        _kill_inside(name)
        if try_ip("netns", "del", name):
            swept.append(name)
    return swept


def _used_subnets() -> set[int]:
    """Third octets of SUPERNET's /24s this namespace already has addresses or routes in."""
    text = ip("-4", "-o", "addr", "show") + ip("-4", "route", "show", "table", "all")
    return {int(m) for m in re.findall(rf"\b{re.escape(SUPERNET)}\.(\d+)\.", text)}


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of SUPERNET that nothing here uses yet, picked at random (parallel runs)."""
    free = sorted(set(range(1, 255)) - _used_subnets())
    if not free:
        raise NetnsError(f"every {SUPERNET}.x.0/24 is in use here")
    return ipaddress.IPv4Network(f"{SUPERNET}.{random.choice(free)}.0/24")


@dataclass(frozen=True)
class Host:
    """One "machine": its namespace, its address, and its port on the switch."""

    role: str
    netns: str
    address: str
    #: its veth's other end, a port of the switch's bridge (a name in the switch namespace)
    port: str


@dataclass
class Cluster:
    """The switch, the hosts on it, and the processes started in them."""

    tag: str
    subnet: ipaddress.IPv4Network
    switch: str
    #: the root namespace's veth end (a name in the root namespace) and its address
    root_dev: str
    root_address: str
    sup: Supervisor = field(default_factory=procs.supervisor)
    hosts: dict[str, Host] = field(default_factory=dict)

    @classmethod
    def create(cls) -> Cluster:
        """The switch and the root namespace's port on it (no hosts yet), on a /24 of its own:
        another run that picked the same one at the same moment makes both pick again."""
        sweep_stale()
        for _ in range(5):
            c = cls._make()
            if not c._shared():
                return c
            c.close()
        raise NetnsError(f"no {SUPERNET}.x.0/24 of our own after 5 tries")

    @classmethod
    def _make(cls) -> Cluster:
        tag = f"{os.getpid()}-{secrets.token_hex(2)}"
        subnet = free_subnet()
        root_dev = f"iq{secrets.token_hex(3)}"
        c = cls(tag, subnet, f"{PREFIX}{tag}-switch", root_dev, str(subnet[254]))
        try:
            ip("netns", "add", c.switch)
            ip("link", "add", BRIDGE, "type", "bridge", netns=c.switch)
            ip("link", "set", BRIDGE, "up", netns=c.switch)
            ip("link", "add", root_dev, "type", "veth", "peer", "name", "root", "netns", c.switch)
            ip("link", "set", "root", "master", BRIDGE, "up", netns=c.switch)
            ip("addr", "add", f"{c.root_address}/24", "dev", root_dev)
            ip("link", "set", root_dev, "up")
        except BaseException:
            c.close()
            raise
        return c

    def _shared(self) -> bool:
        """Whether another device of the root namespace has an address on this /24 too."""
        text = ip("-4", "-o", "addr", "show")
        return any(
            ipaddress.IPv4Address(a) in self.subnet and dev != self.root_dev
            for dev, a in re.findall(r"^\d+:\s+(\S+)\s+inet\s+([\d.]+)/", text, re.MULTILINE)
        )

    def add_host(self, role: str) -> Host:
        """A namespace on the switch, with the next address of the /24."""
        if role in self.hosts:
            raise ValueError(f"host {role!r} exists")
        if len(self.hosts) >= 250:
            raise NetnsError("a /24 holds 250 hosts here")
        host = Host(
            role, f"{PREFIX}{self.tag}-{role}", str(self.subnet[len(self.hosts) + 1]), f"p{len(self.hosts)}"
        )
        self.hosts[role] = host  # before it exists: close() deletes what was made of it
        ip("netns", "add", host.netns)
        ip("link", "set", "lo", "up", netns=host.netns)
        ip(
            "link",
            "add",
            host.port,
            "type",
            "veth",
            "peer",
            "name",
            HOST_DEV,
            "netns",
            host.netns,
            netns=self.switch,
        )
        ip("link", "set", host.port, "master", BRIDGE, "up", netns=self.switch)
        ip("addr", "add", f"{host.address}/24", "dev", HOST_DEV, netns=host.netns)
        ip("link", "set", HOST_DEV, "up", netns=host.netns)
        return host

    def start(
        self,
        host: Host,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """A long-running process in `host`'s namespace (`ip netns exec` execs it: same pid),
        stopped with the cluster or with the test process; its output appended to `log`."""
        inside = ["ip", "netns", "exec", host.netns, *argv]
        if log is None:
            return self.sup.start(name, inside, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
        with log.open("ab") as fh:
            return self.sup.start(name, inside, env=env, cwd=cwd, stdout=fh.fileno())

    def run(self, host: Host, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A short command in `host`'s namespace; its result (not checked)."""
        return procs.run(
            ["ip", "netns", "exec", host.netns, *argv], capture_output=True, text=True, timeout=timeout
        )

    def cut(self, host: Host) -> None:
        """Pull `host`'s cable at the switch: nothing goes in or out; its open connections
        stay open on its side, their writes waiting in its kernel."""
        ip("link", "set", host.port, "down", netns=self.switch)

    def restore(self, host: Host) -> None:
        ip("link", "set", host.port, "up", netns=self.switch)

    def is_cut(self, host: Host) -> bool:
        return "state DOWN" in ip("link", "show", host.port, netns=self.switch)

    def close(self) -> list[str]:
        """Stop every process, then delete every namespace and link made; returns what could
        not be deleted (a finalizer goes on past a failure, to delete the rest)."""
        problems: list[str] = []
        try:
            self.sup.stop_all(timeout=10)
        except Exception as exc:
            problems.append(f"stopping processes: {exc!r}")
        # the root's end first: deleting the switch would take it too, but only once the
        # kernel gets round to it (namespaces are torn down asynchronously)
        try_ip("link", "del", self.root_dev)
        for name in [h.netns for h in self.hosts.values()] + [self.switch]:
            _kill_inside(name)  # none should be left: the Supervisor stopped them
            if name in namespaces() and not try_ip("netns", "del", name):
                problems.append(f"namespace {name}")
        return problems


@contextlib.contextmanager
def cluster(roles: Sequence[str] = ()) -> Iterator[Cluster]:
    """A cluster with a host per role (more with `add_host`), deleted when the block ends,
    however it ends; a leftover is an error, after everything else was deleted."""
    c = Cluster.create()
    try:
        for role in roles:
            c.add_host(role)
        yield c
    finally:
        left = c.close()
    if left:
        raise NetnsError(f"could not delete: {', '.join(left)}")
