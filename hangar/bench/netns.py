"""A network namespace joined to the host by a veth pair, standing in for a guest's network.

Made with ``ip`` (iproute2) under unique names (``hg`` + random suffix), on a random link-local
/30 that no route on the host already covers, and removed on exit even when the body fails.
Benchmarks and tests send traffic only to the two addresses it made.
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


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for _ in range(64):
        base = int(LINK_LOCAL.network_address) + secrets.randbelow(1 << 14) * 4
        subnet = ipaddress.IPv4Network((base, 30))
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
