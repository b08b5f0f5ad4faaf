"""The host network's settings (``HANGAR_NET_*``)."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import pytest
from pydantic import ValidationError

from hangar.errors import NetworkError
from hangar.net.addressing import host_number
from hangar.net.host import HostNetConfig
from hangar.settings import Settings


def config_of(environ: dict[str, str]) -> HostNetConfig:
    """The host network's config from settings read out of ``environ``."""
    values = {key.removeprefix("HANGAR_").lower(): value for key, value in environ.items()}
    return HostNetConfig.from_settings(Settings(_env_file=None, host_id="host-1", **values))


def test_defaults_are_fly_shaped_with_egress_on() -> None:
    config = HostNetConfig.from_settings(
        Settings(
            host_id="host-1",
            net_prefix="fdaa::/16",
            net_egress_subnet="172.19.0.0/16",
            net_egress=True,
            net_egress_interface=None,
            net_host_number=None,
            net_link_prefix="hg",
            net_table="hangar",
        )
    )
    assert config.plan.ula_prefix == IPv6Network("fdaa::/16")
    assert config.plan.egress_subnet == IPv4Network("172.19.0.0/16")
    assert config.egress and config.egress_interface is None
    assert config.host_number == host_number("host-1")
    assert config.names.bridge == "hgbr" and config.table == "hangar"


def test_every_setting_is_read() -> None:
    config = config_of(
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
        ("HANGAR_NET_EGRESS", "maybe"),
        ("HANGAR_NET_HOST_NUMBER", "70000"),
        ("HANGAR_NET_HOST_NUMBER", "many"),
        ("HANGAR_NET_PUBLISHED_TCP", "http"),
    ],
)
def test_a_bad_setting_is_named(name: str, value: str) -> None:
    with pytest.raises((NetworkError, ValidationError)):
        config_of({name: value})
