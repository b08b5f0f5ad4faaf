"""Network namespaces joined to the host by veth pairs: one standing in for a guest's network
(``veth_namespace``), or several on one switch standing in for a fleet's hosts on their LAN
(``namespace_lan``).

Made with ``ip`` (iproute2) under unique names (``hg`` + random suffix), on a random link-local
IPv4 subnet that no route on the host already covers (and, for a LAN, a random IPv6 ULA /64
that exists only between the namespaces), and removed on exit even when the body fails.
Benchmarks and tests send traffic only to the addresses it made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

from hangar.errors import HangarError

LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")
RESERVED = (ipaddress.ip_network("169.254.169.0/24"), ipaddress.ip_network("169.254.0.0/24"))


@dataclass(frozen=True)
class NamespaceLink:
    namespace: str
    host_interface: str
    host_ip: str
    guest_ip: str
    guest_ip6: str = ""
    """The namespace's IPv6 address on a LAN of namespaces (empty for one veth pair)."""

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HangarError(f"ip {' '.join(args)}: {result.stderr.strip()}", argv=list(args))


def _used_networks() -> list[ipaddress.IPv4Network]:
    output = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True, check=False
    ).stdout
    networks = []
    for line in output.splitlines():
        word = line.split(" ", 1)[0]
        with contextlib.suppress(ValueError):
            networks.append(ipaddress.ip_network(word, strict=False))
    return [n for n in networks if isinstance(n, ipaddress.IPv4Network)]


def _free_subnet(prefixlen: int = 30) -> ipaddress.IPv4Network:
    used = _used_networks()
    size = 1 << (32 - prefixlen)
    for _ in range(64):
        base = int(LINK_LOCAL.network_address) + secrets.randbelow((1 << 16) // size) * size
        subnet = ipaddress.IPv4Network((base, prefixlen))
        if any(subnet.overlaps(n) for n in (*used, *RESERVED)):
            continue
        return subnet
    raise HangarError("no free link-local /30 for a test namespace")


@contextlib.contextmanager
def veth_namespace() -> Iterator[NamespaceLink]:
    suffix = secrets.token_hex(4)
    namespace, host_if, guest_if = f"hg-px-{suffix}", f"hgh{suffix}", f"hgg{suffix}"
    subnet = _free_subnet()
    host_ip, guest_ip = (str(address) for address in list(subnet.hosts())[:2])
    _ip("netns", "add", namespace)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", guest_if, "netns", namespace)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", namespace, "addr", "add", f"{guest_ip}/30", "dev", guest_if)
        _ip("-n", namespace, "link", "set", guest_if, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        yield NamespaceLink(namespace, host_if, host_ip, guest_ip)
    finally:
        with contextlib.suppress(HangarError):
            _ip("link", "del", host_if)
        with contextlib.suppress(HangarError):
            _ip("netns", "del", namespace)


MAX_LAN_HOSTS = 12


@contextlib.contextmanager
def namespace_lan(count: int) -> Iterator[list[NamespaceLink]]:
    """``count`` namespaces, each with a veth port on one bridge of this host (a LAN): they
    reach each other directly (IPv4 and IPv6) and this host at the bridge's address
    (``host_ip``, the same for all). Cutting a namespace's ``host_interface`` cuts it off."""
    if not 0 < count <= MAX_LAN_HOSTS:
        raise HangarError(f"a LAN of 1 to {MAX_LAN_HOSTS} namespaces, not {count}", count=count)
    suffix = secrets.token_hex(4)
    bridge = f"hgl{suffix}"
    subnet = _free_subnet(28)
    addresses = [str(address) for address in subnet.hosts()]
    ula = ipaddress.IPv6Network((0xFD << 120 | secrets.randbits(56) << 64, 64))
    links: list[NamespaceLink] = []
    _ip("link", "add", bridge, "type", "bridge")
    try:
        _ip("addr", "add", f"{addresses[0]}/{subnet.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for index in range(count):
            namespace, host_if = f"hg-lan-{suffix}-{index}", f"hgm{suffix}{index}"
            guest_ip, guest_ip6 = addresses[index + 1], str(ula.network_address + index + 2)
            _ip("netns", "add", namespace)
            links.append(NamespaceLink(namespace, host_if, addresses[0], guest_ip, guest_ip6))
            _ip("link", "add", host_if, "type", "veth", "peer", "name", "lan0", "netns", namespace)
            _ip("link", "set", host_if, "master", bridge, "up")
            _ip("-n", namespace, "addr", "add", f"{guest_ip}/{subnet.prefixlen}", "dev", "lan0")
            _ip("-n", namespace, "addr", "add", f"{guest_ip6}/64", "dev", "lan0", "nodad")
            _ip("-n", namespace, "link", "set", "lan0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        yield links
    finally:
        for link in links:
            with contextlib.suppress(HangarError):
                _ip("link", "del", link.host_interface)
            with contextlib.suppress(HangarError):
                _ip("netns", "del", link.namespace)
        with contextlib.suppress(HangarError):
            _ip("link", "del", bridge)
