"""A private network of the test's own on this host: a random link prefix, nftables table, ULA
prefix and egress subnet, and a veth standing for the egress interface; all removed
at the end even if the test fails."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute

from hangar.net.host import HostNetConfig, HostNetwork
from tests.net.netenv import unique_config


@pytest.fixture
def egress_interface() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("host networking tests need root and nft")
    name = f"hg{secrets.token_hex(3)}d"
    with IPRoute() as ipr:  # no dummy module here: one end of a veth pair
        ipr.link("add", ifname=name, kind="veth", peer=f"{name}p")
    try:
        yield name
    finally:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if found:
                ipr.link("del", index=found[0])


@pytest.fixture
def net_config(egress_interface: str) -> HostNetConfig:
    return unique_config(egress_interface=egress_interface)


@pytest.fixture
def network(net_config: HostNetConfig) -> Iterator[HostNetwork]:
    network = HostNetwork(net_config)
    try:
        yield network
    finally:
        network.teardown()
