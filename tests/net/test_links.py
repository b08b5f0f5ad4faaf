"""The bridge, ports (taps, and veths into sandbox machines' network namespaces), ruleset and
reconciliation of ``HostNetwork`` on this host's kernel."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from ipaddress import IPv6Address
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from hangar.agent.network import MachineNetwork
from hangar.clock import SystemClock
from hangar.errors import NetworkError
from hangar.model.config import Tier
from hangar.net import firewall, links
from hangar.net.addressing import GATEWAY_LINK_LOCAL
from hangar.net.host import HostNetwork
from hangar.net.links import LinkNames, PortKind, port_kind
from tests.net.netenv import nft_set, unique_config

ORG = 7


def bridge_addresses(name: str) -> set[str]:
    shown = subprocess.run(
        ["ip", "-j", "addr", "show", "dev", name], capture_output=True, text=True, check=True
    ).stdout
    return {info["local"] for link in json.loads(shown) for info in link["addr_info"]}


def loaded_taps(network: HostNetwork) -> set[object]:
    return set(nft_set("bridge", network.config.table, "taps"))


def raw_tap(name: str) -> None:
    """A tap with no alias: what a crash between creating and labelling one leaves."""
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")


def test_names_fit_interface_names_and_never_match_another_prefix() -> None:
    names = LinkNames("hgab12")
    tap = names.tap("0123456789abcd")
    assert len(tap) == 15 and tap.startswith("hgab12t") and names.is_tap(tap)
    assert names.bridge == "hgab12br"
    assert not LinkNames().is_tap(tap)
    assert not names.is_tap(LinkNames().tap("0123456789abcd"))
    for bad in ("xx", "hg-1", "hgtoolongprefix"):
        with pytest.raises(NetworkError):
            LinkNames(bad)


def test_the_bridge_is_made_once_and_then_ready(network: HostNetwork) -> None:
    assert not network.bridge_ready()

    network.ensure_bridge()
    network.ensure_bridge()

    assert network.bridge_ready()
    plan = network.plan
    assert {str(GATEWAY_LINK_LOCAL), str(plan.dns_address), str(plan.egress_gateway)} <= (
        bridge_addresses(network.bridge)
    )
    forwarding = Path(f"/proc/sys/net/ipv4/conf/{network.bridge}/forwarding")
    assert forwarding.read_text().strip() == "1"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft")
def test_a_host_without_egress_has_no_ipv4_and_no_nat() -> None:
    network = HostNetwork(unique_config(egress_interface=None, egress=False))
    try:
        network.ensure_bridge()
        attachment = network.create_port("m1", ORG)
        network.apply_rules()

        assert attachment.ip4 is None
        assert str(network.plan.egress_gateway) not in bridge_addresses(network.bridge)
        forwarding = Path(f"/proc/sys/net/ipv4/conf/{network.bridge}/forwarding")
        assert forwarding.read_text().strip() == "0"
        assert "hangar.ip4" not in " ".join(network.guest_kernel_args(attachment))
        assert "masquerade" not in network.render_rules()
        assert network.rules_current()
    finally:
        network.teardown()


def test_a_bridge_that_drifted_is_not_ready_until_ensured_again(network: HostNetwork) -> None:
    network.ensure_bridge()
    subprocess.run(
        ["ip", "addr", "del", f"{network.plan.dns_address}/128", "dev", network.bridge], check=True
    )
    assert not network.bridge_ready()
    network.ensure_bridge()
    assert network.bridge_ready()


def test_a_tap_is_created_labelled_attached_and_removed(network: HostNetwork) -> None:
    network.ensure_bridge()
    assert not network.port_ready("m1", ORG)

    attachment = network.create_port("m1", ORG)
    assert network.create_port("m1", ORG) == attachment

    assert network.port_ready("m1", ORG)
    [state] = network.ports()
    assert state.attachment == attachment
    assert state.master == network.bridge and state.up
    assert attachment.ip6 == network.plan.machine_address(ORG, network.config.host_number, "m1")
    assert attachment.ip4 in network.plan.egress_subnet
    assert network.remove_port("m1")
    assert not network.remove_port("m1")
    assert network.ports() == []


def test_egress_addresses_differ_and_stay_while_the_tap_exists(network: HostNetwork) -> None:
    network.ensure_bridge()
    first = network.create_port("m1", ORG)
    second = network.create_port("m2", ORG)

    assert first.ip4 != second.ip4
    assert network.attachment("m1", ORG) == first
    assert network.attachment("m1", ORG).ip6 == first.ip6


def test_a_half_made_tap_is_replaced(network: HostNetwork) -> None:
    network.ensure_bridge()
    raw_tap(network.config.names.tap("m1"))
    assert not network.port_ready("m1", ORG)

    network.create_port("m1", ORG)

    assert network.port_ready("m1", ORG)


def test_a_tap_holding_another_machine_is_refused(network: HostNetwork) -> None:
    network.ensure_bridge()
    first = network.create_port("m1", ORG)
    impostor = network.attachment("m2", ORG).model_copy(update={"tap": first.tap})

    with pytest.raises(NetworkError) as raised:
        links.create_port(impostor, network.bridge, PortKind.TAP)
    assert raised.value.retryable is False
    assert network.port_ready("m1", ORG)


def test_a_tap_needs_the_bridge(network: HostNetwork) -> None:
    with pytest.raises(NetworkError) as raised:
        network.create_port("m1", ORG)
    assert raised.value.retryable is True
    assert network.ports() == []


def test_rules_follow_the_taps_there_are(network: HostNetwork) -> None:
    network.ensure_bridge()
    one = network.create_port("m1", ORG)
    assert not network.rules_current()

    network.apply_rules()
    assert network.rules_current()
    assert loaded_taps(network) == {one.tap}

    two = network.create_port("m2", ORG + 1)
    assert not network.rules_current()
    network.apply_rules()
    assert loaded_taps(network) == {one.tap, two.tap}


def test_reconcile_removes_what_no_record_owns(network: HostNetwork) -> None:
    network.ensure_bridge()
    kept = network.create_port("m1", ORG)
    network.create_port("m2", ORG)
    network.apply_rules()
    network.create_port("m3", ORG + 1)  # crash: tap made, rules not yet applied
    half_made = network.config.names.tap("m4")
    raw_tap(half_made)  # crash: tap made, not yet labelled

    report = network.reconcile({"m1", "m3"})

    assert sorted(report.removed_ports) == sorted([network.config.names.tap("m2"), half_made])
    assert report.rules_applied
    assert {tap.name for tap in network.ports()} == {kept.tap, network.config.names.tap("m3")}
    assert loaded_taps(network) == {kept.tap, network.config.names.tap("m3")}
    assert network.rules_current()
    again = network.reconcile({"m1", "m3"})
    assert again.removed_ports == [] and not again.rules_applied


@pytest.mark.parametrize("crash", ["after_create_tap", "after_apply_rules", "after_remove_tap"])
def test_a_crash_after_any_step_leaves_nothing_behind(network: HostNetwork, crash: str) -> None:
    """Start: ensure_bridge, create_tap, apply_rules; stop: remove_tap, apply_rules. Killed
    after ``crash``, the machine's record then says it is stopped: reconcile owns nothing."""
    network.ensure_bridge()
    network.create_port("m1", ORG)
    if crash != "after_create_tap":
        network.apply_rules()
    if crash == "after_remove_tap":
        network.remove_port("m1")

    network.reconcile(set())

    assert network.ports() == []
    assert loaded_taps(network) == set()
    assert network.rules_current()
    assert network.bridge_ready()


def test_reconcile_after_a_crash_mid_start_keeps_an_owned_machine(network: HostNetwork) -> None:
    network.ensure_bridge()
    attachment = network.create_port("m1", ORG)

    network.reconcile({"m1"})

    assert network.port_ready("m1", ORG)
    assert loaded_taps(network) == {attachment.tap}


def test_reconcile_puts_owned_taps_back_on_a_bridge_that_was_lost(network: HostNetwork) -> None:
    network.ensure_bridge()
    kept = network.create_port("m1", ORG)
    network.apply_rules()
    links.remove_bridge(network.bridge)  # the taps stay, off any bridge

    report = network.reconcile({"m1"})

    assert report.removed_ports == []
    assert network.bridge_ready() and network.port_ready("m1", ORG)
    assert loaded_taps(network) == {kept.tap}


def test_teardown_removes_taps_rules_and_bridge(network: HostNetwork) -> None:
    network.ensure_bridge()
    network.create_port("m1", ORG)
    network.apply_rules()

    network.teardown()
    network.teardown()

    assert network.ports() == []
    assert not firewall.table_exists("inet", network.config.table)
    assert not links.remove_bridge(network.bridge)


def test_guest_kernel_args_and_nic_describe_the_attachment(network: HostNetwork) -> None:
    network.ensure_bridge()
    attachment = network.create_port("m1", ORG)
    args = network.guest_kernel_args(attachment)
    plan = network.plan
    assert args == [
        f"hangar.mac={attachment.mac}",
        f"hangar.ip6={attachment.ip6}/64",
        "hangar.gw6=fe80::1",
        f"hangar.dns={plan.dns_address}",
        f"hangar.ip4={attachment.ip4}/{plan.egress_subnet.prefixlen}",
        f"hangar.gw4={plan.egress_gateway}",
    ]
    assert network.nic(attachment).tap == attachment.tap
    assert IPv6Address(args[1].split("=")[1].split("/")[0]) == attachment.ip6


# sandbox machines: a veth into a network namespace of the machine's own
def ns_json(namespace: str, *argv: str) -> list[dict[str, object]]:
    shown = subprocess.run(
        ["ip", "-n", namespace, "-j", *argv], capture_output=True, text=True, check=True
    ).stdout
    result: list[dict[str, object]] = json.loads(shown)
    return result


def ns_addresses(namespace: str) -> set[str]:
    return {
        f"{info['local']}/{info['prefixlen']}"  # type: ignore[index]
        for link in ns_json(namespace, "addr", "show", "dev", "eth0")
        for info in link["addr_info"]  # type: ignore[attr-defined]
        if info["scope"] != "link"  # type: ignore[index]
    }


def ns_default_routes(namespace: str) -> set[str]:
    found = set()
    for family in ("-4", "-6"):
        for route in ns_json(namespace, family, "route", "show", "default"):
            found.add(str(route["gateway"]))
    return found


def test_the_port_kind_follows_the_tier() -> None:
    assert port_kind(Tier.VM) is PortKind.TAP
    assert port_kind(Tier.SANDBOX) is PortKind.VETH


def test_namespace_names_fit_and_never_match_another_prefix() -> None:
    names = LinkNames("hgab12")
    namespace = names.netns("0123456789abcd")
    assert len(namespace) == 15 and names.is_netns(namespace)
    assert namespace[len("hgab12n") :] == names.tap("0123456789abcd")[len("hgab12t") :]
    assert not names.is_tap(namespace) and not names.is_netns(names.tap("0123456789abcd"))
    assert not LinkNames().is_netns(namespace)


def test_a_veth_port_is_made_with_its_namespace_and_removed_with_it(network: HostNetwork) -> None:
    network.ensure_bridge()
    names = network.config.names
    assert not network.port_ready("s1", ORG, PortKind.VETH)

    attachment = network.create_port("s1", ORG, PortKind.VETH)
    assert network.create_port("s1", ORG, PortKind.VETH) == attachment

    assert network.port_ready("s1", ORG, PortKind.VETH)
    assert not network.port_ready("s1", ORG, PortKind.TAP)
    [state] = network.ports()
    assert state.kind is PortKind.VETH and state.name == names.tap("s1")
    assert state.attachment == attachment and state.master == network.bridge and state.up
    namespace = names.netns("s1")
    assert links.list_namespaces(names) == [namespace]
    [eth0] = ns_json(namespace, "link", "show", "dev", "eth0")
    assert eth0["address"] == attachment.mac and "UP" in eth0["flags"]  # type: ignore[operator]
    [lo] = ns_json(namespace, "link", "show", "dev", "lo")
    assert "UP" in lo["flags"]  # type: ignore[operator]
    plan = network.plan
    assert ns_addresses(namespace) == {
        f"{attachment.ip6}/64",
        f"{attachment.ip4}/{plan.egress_subnet.prefixlen}",
    }
    assert ns_default_routes(namespace) == {str(GATEWAY_LINK_LOCAL), str(plan.egress_gateway)}
    config = network.namespace(attachment)
    assert config.path == links.NETNS_DIR / namespace and config.path.exists()
    assert network.nic(attachment, config.path).netns == config.path

    assert network.remove_port("s1")
    assert not network.remove_port("s1")
    assert network.ports() == [] and links.list_namespaces(names) == []


def test_each_sandbox_boot_gets_its_addresses_back(network: HostNetwork) -> None:
    """gVisor's netstack takes eth0's addresses (and so its routes) when a sandbox starts: the
    port stays ready, and the next boot's preparation puts them back."""
    network.ensure_bridge()
    attachment = network.create_port("s1", ORG, PortKind.VETH)
    namespace = network.config.names.netns("s1")
    subprocess.run(["ip", "-n", namespace, "addr", "flush", "dev", "eth0"], check=True)
    assert ns_addresses(namespace) == set()
    assert network.port_ready("s1", ORG, PortKind.VETH)

    network.prepare_namespace(attachment)
    network.prepare_namespace(attachment)

    assert f"{attachment.ip6}/64" in ns_addresses(namespace)
    assert str(GATEWAY_LINK_LOCAL) in ns_default_routes(namespace)


def test_a_port_changes_kind_with_its_machine(network: HostNetwork) -> None:
    network.ensure_bridge()
    network.create_port("m1", ORG, PortKind.TAP)
    network.create_port("m1", ORG, PortKind.VETH)
    assert [port.kind for port in network.ports()] == [PortKind.VETH]
    assert network.port_ready("m1", ORG, PortKind.VETH)

    network.create_port("m1", ORG, PortKind.TAP)
    assert [port.kind for port in network.ports()] == [PortKind.TAP]
    network.remove_port("m1")  # the namespace left behind goes too
    assert links.list_namespaces(network.config.names) == []


def test_a_veth_whose_namespace_was_lost_is_made_again(network: HostNetwork) -> None:
    network.ensure_bridge()
    network.create_port("s1", ORG, PortKind.VETH)
    links.remove_namespace(network.config.names.netns("s1"))
    assert not network.port_ready("s1", ORG, PortKind.VETH)

    network.create_port("s1", ORG, PortKind.VETH)

    assert network.port_ready("s1", ORG, PortKind.VETH)


def test_reconcile_removes_namespaces_and_veths_no_record_owns(network: HostNetwork) -> None:
    network.ensure_bridge()
    names = network.config.names
    kept = network.create_port("s1", ORG, PortKind.VETH)
    network.create_port("s2", ORG, PortKind.VETH)
    network.apply_rules()
    links.create_namespace(names.netns("s3"))  # crash: namespace made, no veth yet
    links.create_namespace(names.netns("s4"))  # the same, for a machine still starting
    network.create_port("m5", ORG, PortKind.TAP)
    links.create_namespace(names.netns("m5"))  # a VM now: its old namespace is of no use

    report = network.reconcile({"s1", "s4", "m5"})

    assert report.removed_ports == [names.tap("s2")]
    assert sorted(report.removed_namespaces) == sorted(
        [names.netns("s2"), names.netns("s3"), names.netns("m5")]
    )
    assert sorted(links.list_namespaces(names)) == sorted([names.netns("s1"), names.netns("s4")])
    assert network.port_ready("s1", ORG, PortKind.VETH)
    assert loaded_taps(network) == {kept.tap, names.tap("m5")}
    again = network.reconcile({"s1", "s4", "m5"})
    assert again.removed_ports == [] and again.removed_namespaces == []


@pytest.mark.parametrize(
    "crash", ["after_create_namespace", "after_create_port", "after_apply_rules", "after_remove"]
)
def test_a_sandbox_crash_after_any_step_leaves_nothing_behind(
    network: HostNetwork, crash: str
) -> None:
    network.ensure_bridge()
    links.create_namespace(network.config.names.netns("s1"))
    if crash != "after_create_namespace":
        network.create_port("s1", ORG, PortKind.VETH)
    if crash in ("after_apply_rules", "after_remove"):
        network.apply_rules()
    if crash == "after_remove":
        network.remove_port("s1")

    network.reconcile(set())

    assert network.ports() == []
    assert links.list_namespaces(network.config.names) == []
    assert loaded_taps(network) == set()
    assert network.rules_current()


def test_a_detach_after_the_network_was_taken_down_leaves_no_tables(
    network: HostNetwork,
) -> None:
    """A machine let go after its host's network was removed (a server shutting down) must not
    load the ruleset again: no bridge, no tables."""
    network.ensure_bridge()
    network.create_port("m1", ORG)
    network.apply_rules()
    network.teardown()

    asyncio.run(MachineNetwork(network, SystemClock()).detach("m1"))

    assert not firewall.table_exists("inet", network.config.table)
    assert not firewall.table_exists("bridge", network.config.table)
    assert not network.bridge_present()
