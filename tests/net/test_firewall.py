"""The ruleset: rendered text (pure) and the same text loaded into the kernel's nftables."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from hangar.errors import NetworkError
from hangar.net import firewall
from hangar.net.addressing import AddressPlan, machine_mac
from hangar.net.attachment import Attachment
from hangar.net.firewall import FirewallPolicy, render_ruleset
from tests.net.netenv import nft_set, unique_suffix

PLAN = AddressPlan(IPv6Network("fd12:3456::/32"), IPv4Network("172.30.7.0/24"))
ORG_A, ORG_B = 11, 22


def attachment(name: str, org: int, index: int) -> Attachment:
    return Attachment(
        machine_id=name,
        org_number=org,
        tap=f"hgzzt{index:010x}",
        mac=machine_mac(name),
        ip6=PLAN.machine_address(org, 5, name),
        ip4=IPv4Address(f"172.30.7.{10 + index}"),
    )


A1, A2, B1 = attachment("a1", ORG_A, 1), attachment("a2", ORG_A, 2), attachment("b1", ORG_B, 3)


def policy(table: str = "hangar_unit", **changes: object) -> FirewallPolicy:
    fields: dict[str, object] = {
        "table": table,
        "bridge": "hgzzbr",
        "tap_head": "hgzzt",
        "dns_address": PLAN.dns_address,
        "org_prefixes": {ORG_A: PLAN.org_prefix(ORG_A), ORG_B: PLAN.org_prefix(ORG_B)},
        "egress_interface": "hgzzeg",
        "egress_subnet": PLAN.egress_subnet,
        "published_tcp": frozenset({443, 8080}),
    }
    fields.update(changes)
    return FirewallPolicy(**fields)  # type: ignore[arg-type]


def chain(ruleset: str, name: str) -> str:
    start = ruleset.index(f"\tchain {name} {{")
    return ruleset[start : ruleset.index("\t}", start)]


def test_each_tap_may_send_only_from_its_own_mac_and_addresses() -> None:
    text = render_ruleset(policy(), [A1, A2, B1])
    for a in (A1, A2, B1):
        assert f'"{a.tap}" . {a.mac}' in text
        assert f'"{a.tap}" . {a.ip6}' in text
        assert f'"{a.tap}" . {a.link_local}' in text
        assert f'"{a.tap}" . {a.ip4}' in text
    ports_in = chain(text, "ports_in")
    assert "iifname . ether saddr != @tap_mac" in ports_in
    assert "iifname . ip6 saddr != @tap_ip6" in ports_in
    assert ports_in.rstrip().endswith('counter name "spoofed" drop')


def test_a_tap_reaches_only_taps_of_its_org() -> None:
    text = render_ruleset(policy(), [A1, A2, B1])
    assert f'"{A1.tap}" : jump org_{ORG_A}' in text
    assert f'"{B1.tap}" : jump org_{ORG_B}' in text
    org_a_taps = text[text.index(f"set org_{ORG_A}_taps") :].split("}")[0]
    assert A1.tap in org_a_taps and A2.tap in org_a_taps and B1.tap not in org_a_taps
    assert f"oifname @org_{ORG_A}_taps accept" in chain(text, f"org_{ORG_A}")
    routed_same_org = chain(text, "same_org")
    assert f"ip6 saddr {PLAN.org_prefix(ORG_A)} ip6 daddr {PLAN.org_prefix(ORG_A)} accept" in (
        routed_same_org
    )


def test_the_host_is_closed_but_for_dns_and_published_ports() -> None:
    guest_to_host = chain(render_ruleset(policy(), [A1]), "guest_to_host")
    assert f"ip6 daddr {PLAN.dns_address} udp dport 53 accept" in guest_to_host
    assert f"ip6 daddr {PLAN.dns_address} tcp dport 53 accept" in guest_to_host
    assert "tcp dport @published_tcp accept" in guest_to_host
    assert guest_to_host.rstrip().endswith('counter name "host_blocked" drop')
    assert "elements = { 443, 8080 }" in render_ruleset(policy(), [A1])


def test_egress_is_nat_on_the_egress_interface_or_nothing() -> None:
    with_egress = render_ruleset(policy(), [A1])
    assert 'oifname "hgzzeg" ip saddr 172.30.7.0/24 masquerade' in with_egress
    assert 'iifname "hgzzbr" oifname "hgzzeg" ip saddr 172.30.7.0/24' in with_egress
    without = render_ruleset(policy(egress_interface=None, egress_subnet=None), [A1])
    assert "masquerade" not in without and "hgzzeg" not in without
    assert 'iifname "hgzzbr" counter name "routed_blocked" drop' in without


def test_rendering_is_deterministic_and_digested() -> None:
    one = render_ruleset(policy(), [A1, A2, B1])
    assert one == render_ruleset(policy(), [B1, A2, A1])
    assert firewall.ruleset_digest(one) is not None
    assert firewall.ruleset_digest(one) != firewall.ruleset_digest(render_ruleset(policy(), [A1]))


def test_an_empty_host_renders_a_loadable_shape() -> None:
    text = render_ruleset(policy(), [])
    assert "elements" not in chain(text, "ports_in")
    assert "chain org_" not in text


@pytest.mark.parametrize("shared", ["tap", "mac", "ip6", "ip4"])
def test_two_machines_sharing_an_identity_are_refused(shared: str) -> None:
    twin = B1.model_copy(update={shared: getattr(A1, shared)})
    with pytest.raises(NetworkError) as raised:
        render_ruleset(policy(), [A1, twin])
    assert raised.value.fields["field"] == shared


@pytest.mark.parametrize(
    "changes",
    [
        {"table": "Bad-Name"},
        {"tap_head": 'hg" accept'},
        {"bridge": 'x" accept'},
        {"egress_interface": "a b"},
        {"egress_subnet": None},
        {"published_tcp": frozenset({70000})},
    ],
)
def test_a_policy_nft_would_misread_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(NetworkError):
        policy(**changes)


def test_an_org_without_a_prefix_is_refused() -> None:
    with pytest.raises(NetworkError):
        render_ruleset(policy(org_prefixes={ORG_A: PLAN.org_prefix(ORG_A)}), [A1, B1])


# the kernel


@pytest.fixture
def table() -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("loading rules needs root and nft")
    name = f"hangar_test_{unique_suffix()}"
    try:
        yield name
    finally:
        firewall.remove_ruleset(name)


def test_the_rendered_ruleset_loads_and_is_recognised(table: str) -> None:
    text = render_ruleset(policy(table), [A1, A2, B1])
    assert not firewall.ruleset_current(table, text)

    firewall.apply_ruleset(text)

    assert firewall.ruleset_current(table, text)
    assert len(nft_set("bridge", table, "taps")) == 3
    assert len(nft_set("bridge", table, "tap_ip6")) == 6
    assert len(nft_set("bridge", table, f"org_{ORG_A}_taps")) == 2
    assert firewall.read_counters(table) == {name: 0 for name in firewall.COUNTERS}


def test_a_reload_replaces_everything_at_once(table: str) -> None:
    firewall.apply_ruleset(render_ruleset(policy(table), [A1, A2, B1]))
    smaller = render_ruleset(policy(table), [A1])

    firewall.apply_ruleset(smaller)
    firewall.apply_ruleset(smaller)

    assert firewall.ruleset_current(table, smaller)
    assert len(nft_set("bridge", table, "taps")) == 1
    out = subprocess.run(["nft", "list", "table", "bridge", table], capture_output=True, text=True)
    assert f"org_{ORG_B}" not in out.stdout


def test_a_rejected_ruleset_leaves_the_loaded_one_whole(table: str) -> None:
    good = render_ruleset(policy(table), [A1, A2])
    firewall.apply_ruleset(good)
    broken = render_ruleset(policy(table), [A1]).replace("masquerade", "masquerade nonsense")

    with pytest.raises(NetworkError):
        firewall.apply_ruleset(broken)

    assert firewall.ruleset_current(table, good)
    assert len(nft_set("bridge", table, "taps")) == 2


def test_removal_deletes_both_tables_and_can_repeat(table: str) -> None:
    firewall.apply_ruleset(render_ruleset(policy(table), [A1]))

    firewall.remove_ruleset(table)
    firewall.remove_ruleset(table)

    assert not firewall.table_exists("bridge", table)
    assert not firewall.table_exists("inet", table)
    assert firewall.loaded_digest(table) is None
    assert firewall.read_counters(table) == {}
