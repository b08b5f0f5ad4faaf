"""Unique names and address ranges for tests that make host networks, so that tests running at
the same time on one machine never share a link, a table, a prefix or a subnet."""

from __future__ import annotations

import json
import secrets
import socket
import string
import subprocess
from ipaddress import IPv4Network, IPv6Network, ip_network

from pyroute2 import IPRoute

from hangar.net.addressing import AddressPlan
from hangar.net.host import HostNetConfig
from hangar.net.links import LinkNames

_ALPHABET = string.ascii_lowercase + string.digits


def _routes() -> list[IPv4Network | IPv6Network]:
    found: list[IPv4Network | IPv6Network] = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_routes(family=family):
                dst = route.get_attr("RTA_DST")
                if dst is not None:
                    found.append(ip_network(f"{dst}/{route['dst_len']}", strict=False))
    return found


def _free(candidate: IPv4Network | IPv6Network) -> bool:
    return not any(
        route.version == candidate.version and route.overlaps(candidate)  # type: ignore[arg-type]
        for route in _routes()
    )


def unique_ula_prefix() -> IPv6Network:
    """A random ``fdXX:XXXX::/32`` that no route on this host overlaps."""
    while True:
        first = secrets.randbelow(0xFF) + 1
        candidate = IPv6Network(f"fd{first:02x}:{secrets.randbits(16):04x}::/32")
        if _free(candidate):
            return candidate


def unique_ipv4_subnet(prefixlen: int = 24) -> IPv4Network:
    """A random ``/prefixlen`` in 172.30.0.0/15 that no route on this host overlaps."""
    pool = IPv4Network("172.30.0.0/15")
    subnets = list(pool.subnets(new_prefix=prefixlen))
    while True:
        candidate = subnets[secrets.randbelow(len(subnets))]
        if _free(candidate):
            return candidate


def unique_suffix(length: int = 4) -> str:
    """Random characters; never a leading ``t``, so a test's link names never start like the
    default prefix's taps (``hgt...``)."""
    first = secrets.choice(_ALPHABET.replace("t", ""))
    return first + "".join(secrets.choice(_ALPHABET) for _ in range(length - 1))


def unique_config(*, egress_interface: str | None, egress: bool = True) -> HostNetConfig:
    suffix = unique_suffix()
    return HostNetConfig(
        host_number=secrets.randbelow(1 << 16),
        plan=AddressPlan(unique_ula_prefix(), unique_ipv4_subnet()),
        names=LinkNames(f"hg{suffix}"),
        table=f"hangar_test_{suffix}",
        egress=egress,
        egress_interface=egress_interface,
    )


def nft_set(family: str, table: str, name: str) -> list[object]:
    """The elements of a loaded nftables set, as ``nft -j`` lists them."""
    listed = subprocess.run(
        ["nft", "-j", "list", "set", family, table, name],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for item in json.loads(listed)["nftables"]:
        if "set" in item:
            return list(item["set"].get("elem", []))
    raise AssertionError(f"no set {name} in {family} {table}")
