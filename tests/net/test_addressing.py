"""The address plan: pure, deterministic, collision-checked."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hangar.errors import NetworkError
from hangar.net.addressing import (
    DEFAULT_ULA_PREFIX,
    AddressPlan,
    allocate_number,
    bridge_mac,
    host_number,
    link_local_of,
    machine_mac,
)
from hangar.net.attachment import Attachment

PLAN = AddressPlan()
machine_ids = st.text(alphabet="0123456789abcdef", min_size=14, max_size=14)


def test_the_default_plan_is_fly_shaped() -> None:
    assert PLAN.ula_prefix == DEFAULT_ULA_PREFIX == IPv6Network("fdaa::/16")
    assert PLAN.dns_address == IPv6Address("fdaa::3")
    assert PLAN.org_bits == 32
    assert PLAN.egress_gateway == IPv4Address("172.19.0.1")


def test_a_machine_address_encodes_org_host_and_machine() -> None:
    org = PLAN.org_number("acme")
    address = PLAN.machine_address(org, 7, "0123456789abcd")

    assert address in PLAN.org_prefix(org)
    assert address in PLAN.org_host_prefix(org, 7)
    assert PLAN.org_host_prefix(org, 7).prefixlen == 64
    assert PLAN.org_prefix(org).prefixlen == 48
    assert PLAN.org_of(address) == org
    # Stable: the same machine on the same host always gets the same address.
    assert PLAN.machine_address(org, 7, "0123456789abcd") == address
    # Another host: another /64 of the same org /48.
    elsewhere = PLAN.machine_address(org, 8, "0123456789abcd")
    assert elsewhere != address and elsewhere in PLAN.org_prefix(org)


@given(machine_ids, st.integers(0, 65535), st.text(min_size=1, max_size=30))
def test_every_machine_address_is_in_its_org_and_not_infrastructure(
    machine_id: str, host: int, org_slug: str
) -> None:
    org = PLAN.org_number(org_slug)
    address = PLAN.machine_address(org, host, machine_id)

    assert org != 0
    assert PLAN.org_of(address) == org
    assert int(address) & 0xFFFF_FFFF_FFFF_FFFF >= 1 << 16
    assert address != PLAN.dns_address


def test_orgs_are_isolated_by_prefix() -> None:
    acme = PLAN.org_number("acme")
    other = PLAN.org_number("other", {acme: "acme"})
    assert acme != other
    assert not PLAN.org_prefix(acme).overlaps(PLAN.org_prefix(other))
    assert PLAN.org_of(PLAN.dns_address) is None
    assert PLAN.org_of(IPv6Address("fd00::1")) is None


def test_a_colliding_number_is_probed_deterministically() -> None:
    first = allocate_number("org", "acme", 32, {})
    moved = allocate_number("org", "acme", 32, {first: "squatter"})

    assert moved != first
    assert allocate_number("org", "acme", 32, {first: "squatter"}) == moved
    assert allocate_number("org", "acme", 32, {first: "acme"}) == first


def test_an_exhausted_number_space_is_an_error() -> None:
    with pytest.raises(NetworkError) as raised:
        allocate_number("org", "acme", 1, {0: "a", 1: "b"})
    assert raised.value.fields["key"] == "acme"
    assert raised.value.retryable is False


def test_host_numbers_fit_sixteen_bits_and_probe_past_other_hosts() -> None:
    number = host_number("host-1")
    assert 0 <= number < 1 << 16
    assert host_number("host-1", {number: "host-2"}) != number


@pytest.mark.parametrize(
    ("prefix", "subnet"),
    [
        ("fe80::/16", "172.19.0.0/16"),  # not a ULA
        ("fd00::/40", "172.19.0.0/16"),  # no room for orgs
        ("fc00::/8", "172.19.0.0/16"),  # not in fd00::/8
        ("fdaa::/16", "100.64.0.0/16"),  # not a private IPv4 range
        ("fdaa::/16", "172.19.0.0/30"),  # too small
        ("fdaa::/16", "not-a-subnet"),
    ],
)
def test_bad_operator_settings_are_refused(prefix: str, subnet: str) -> None:
    with pytest.raises(NetworkError):
        AddressPlan.parse(prefix, subnet)


def test_org_and_host_numbers_out_of_range_are_refused() -> None:
    with pytest.raises(NetworkError):
        PLAN.org_prefix(0)
    with pytest.raises(NetworkError):
        PLAN.org_prefix(1 << 32)
    with pytest.raises(NetworkError):
        PLAN.org_host_prefix(1, 1 << 16)


def test_a_narrower_operator_prefix_leaves_fewer_org_bits() -> None:
    plan = AddressPlan(IPv6Network("fd12:3456::/32"))
    org = plan.org_number("acme")
    assert plan.org_bits == 16 and 0 < org < 1 << 16
    assert plan.dns_address == IPv6Address("fd12:3456::3")
    assert plan.machine_address(org, 1, "m") in IPv6Network("fd12:3456::/32")


def test_macs_are_locally_administered_unicast_and_stable() -> None:
    mac = machine_mac("0123456789abcd")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert machine_mac("0123456789abcd") == mac != machine_mac("0123456789abce")
    assert bridge_mac(0x1234) == "0a:00:00:00:12:34"


def test_link_local_is_the_eui64_linux_derives() -> None:
    assert link_local_of("06:8d:f5:0b:27:9a") == IPv6Address("fe80::48d:f5ff:fe0b:279a")


def test_egress_addresses_skip_the_gateway_and_taken_ones() -> None:
    plan = AddressPlan(egress_subnet=IPv4Network("172.19.0.0/28"))
    usable = set(plan.egress_subnet.hosts()) - {plan.egress_gateway}
    taken: list[IPv4Address] = []
    for index in range(len(usable)):
        address = plan.egress_address(f"m{index}", taken)
        assert address in usable and address not in taken
        taken.append(address)
    with pytest.raises(NetworkError) as raised:
        plan.egress_address("one-too-many", taken)
    assert raised.value.retryable is True


def test_an_attachment_round_trips_through_the_tap_alias() -> None:
    attachment = Attachment(
        machine_id="m" * 63,
        org_number=(1 << 32) - 1,
        tap="hgt0123456789ab",
        mac=machine_mac("m"),
        ip6=IPv6Address("fdaa:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        ip4=IPv4Address("172.19.255.254"),
    )
    assert Attachment.from_alias(attachment.alias()) == attachment
    without_egress = attachment.model_copy(update={"ip4": None})
    assert Attachment.from_alias(without_egress.alias()) == without_egress


@pytest.mark.parametrize(
    "alias",
    [None, "", "someone else's alias", "hangar1 m=x", "hangar1 m=x o=1 t=hgt1 e=06:00 6=fdaa::1",
     "hangar1 m=x o=1 t=hgt1 e=06:00:00:00:00:01 6=fdaa::1 z=1"],
)  # fmt: skip
def test_an_alias_hangar_did_not_write_whole_is_no_attachment(alias: str | None) -> None:
    assert Attachment.from_alias(alias) is None
