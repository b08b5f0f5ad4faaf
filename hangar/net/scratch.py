"""Unique names and address ranges for host networks made by tests and benchmarks, so that
several running at once on one machine never share a link, a table, a prefix or a subnet."""

from __future__ import annotations

import secrets
import socket
import string
from ipaddress import IPv4Network, IPv6Network, ip_network

from pyroute2 import IPRoute

from hangar.settings import env_name

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
        route.version == candidate.version and route.overlaps(candidate) for route in _routes()
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
    """Random characters; never a leading ``t``, so these link names never start like the
    default prefix's taps (``hgt...``)."""
    first = secrets.choice(_ALPHABET.replace("t", ""))
    return first + "".join(secrets.choice(_ALPHABET) for _ in range(length - 1))


def scratch_network_settings() -> dict[str, str]:
    """``HANGAR_NET_*`` settings for a server of its own: its own bridge, taps, tables,
    prefix and egress subnet, and no egress (nothing leaves this machine)."""
    suffix = unique_suffix()
    return {
        env_name("net_link_prefix"): f"hg{suffix}",
        env_name("net_table"): f"hangar_test_{suffix}",
        env_name("net_prefix"): str(unique_ula_prefix()),
        env_name("net_egress_subnet"): str(unique_ipv4_subnet()),
        env_name("net_egress"): "0",
    }
