"""A private network of the test's own on this host: a random link prefix, nftables table, ULA
prefix and egress subnet, all removed at the end even if the test fails."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest

from hangar.net.host import HostNetConfig, HostNetwork
from tests.net.netenv import unique_config


@pytest.fixture
def net_config() -> HostNetConfig:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("host networking tests need root and nft")
    return unique_config(egress_interface=f"hg{secrets.token_hex(3)}x")


@pytest.fixture
def network(net_config: HostNetConfig) -> Iterator[HostNetwork]:
    network = HostNetwork(net_config)
    try:
        yield network
    finally:
        network.teardown()
