"""The host network's settings (``HANGAR_NET_*``)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import pytest

from hangar.errors import NetworkError
from hangar.net.addressing import host_number
from hangar.net.host import HostNetConfig


def test_defaults_are_fly_shaped_with_egress_on() -> None:
    config = HostNetConfig.from_env("host-1", {})
    assert config.plan.ula_prefix == IPv6Network("fdaa::/16")
    assert config.plan.egress_subnet == IPv4Network("172.19.0.0/16")
    assert config.egress and config.egress_interface is None
    assert config.host_number == host_number("host-1")
    assert config.names.bridge == "hgbr" and config.table == "hangar"


def test_every_setting_is_read() -> None:
    config = HostNetConfig.from_env(
        "host-1",
        {
            "HANGAR_NET_PREFIX": "fd12:3400::/24",
            "HANGAR_NET_EGRESS": "0",
            "HANGAR_NET_EGRESS_SUBNET": "10.99.0.0/16",
            "HANGAR_NET_EGRESS_INTERFACE": "uplink0",
            "HANGAR_NET_HOST_NUMBER": "42",
            "HANGAR_NET_PUBLISHED_TCP": "80, 443",
        },
    )
    assert config.plan.ula_prefix == IPv6Network("fd12:3400::/24")
    assert config.plan.org_bits == 24
    assert not config.egress and config.egress_interface == "uplink0"
    assert config.host_number == 42
    assert config.published_tcp == frozenset({80, 443})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HANGAR_NET_PREFIX", "2001:db8::/32"),
        ("HANGAR_NET_EGRESS", "yes"),
        ("HANGAR_NET_HOST_NUMBER", "70000"),
        ("HANGAR_NET_HOST_NUMBER", "many"),
        ("HANGAR_NET_PUBLISHED_TCP", "http"),
    ],
)
def test_a_bad_setting_is_named(name: str, value: str) -> None:
    with pytest.raises(NetworkError):
        HostNetConfig.from_env("host-1", {name: value})
