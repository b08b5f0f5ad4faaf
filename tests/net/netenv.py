"""Unique names and address ranges for tests that make host networks, so that tests running at
the same time on one machine never share a link, a table, a prefix or a subnet."""

from __future__ import annotations

import json
import secrets
import subprocess

from hangar.net.addressing import AddressPlan
from hangar.net.host import HostNetConfig
from hangar.net.links import LinkNames
from hangar.net.scratch import unique_ipv4_subnet, unique_suffix, unique_ula_prefix

__all__ = ["nft_set", "unique_config", "unique_ipv4_subnet", "unique_suffix", "unique_ula_prefix"]


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
