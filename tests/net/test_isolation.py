"""hangar's bridge and ruleset with real packets: namespaces stand in for machines (the guest
tests in test_guests.py do the same with QEMU guests). Two orgs: a1 and a2 in org A, b1 in B."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from hangar.net import firewall
from hangar.net.dns import DnsMachine, SnapshotView
from hangar.net.host import HostNetwork
from tests.net.netenv import unique_config, unique_ipv4_subnet
from tests.net.netns import (
    BackgroundDns,
    NsMachine,
    Outside,
    http_listener,
    ns_http_listener,
    ns_machine,
    outside,
)

ORG_A, ORG_B = "org-a", "org-b"


@dataclass(frozen=True)
class Topology:
    network: HostNetwork
    a1: NsMachine
    a2: NsMachine
    b1: NsMachine
    outside: Outside
    published_port: int
    dns: BackgroundDns


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("host networking tests need root and nft")
    egress_interface = f"hg{secrets.token_hex(3)}e"
    with contextlib.ExitStack() as stack, http_listener("published") as published_port:
        config = unique_config(egress_interface=egress_interface)
        config = type(config)(**{**config.__dict__, "published_tcp": frozenset({published_port})})
        world = stack.enter_context(outside(egress_interface, unique_ipv4_subnet(30)))
        network = HostNetwork(config)
        stack.callback(network.teardown)
        network.ensure_bridge()
        plan = config.plan
        org_a = plan.org_number(ORG_A)
        org_b = plan.org_number(ORG_B, {org_a: ORG_A})
        attachments = [
            network.attachment("a1" + secrets.token_hex(6), org_a),
            network.attachment("a2" + secrets.token_hex(6), org_a),
            network.attachment("b1" + secrets.token_hex(6), org_b),
        ]
        # Distinct egress addresses, as create_tap would choose them one after the other.
        taken = [attachments[0].ip4]
        for index in (1, 2):
            ip4 = plan.egress_address(attachments[index].machine_id, taken)  # type: ignore[arg-type]
            attachments[index] = attachments[index].model_copy(update={"ip4": ip4})
            taken.append(ip4)
        machines = [stack.enter_context(ns_machine(a, network.bridge, plan)) for a in attachments]
        firewall.apply_ruleset(network.render_rules(attachments))
        stack.callback(firewall.remove_ruleset, config.table)
        view = SnapshotView(
            {ORG_A: ["web"], ORG_B: ["other"]},
            [
                DnsMachine(m.attachment.machine_id, app, org, "local", "h1", m.attachment.ip6, True)
                for m, app, org in zip(
                    machines, ["web", "web", "other"], [ORG_A, ORG_A, ORG_B], strict=True
                )
            ],
        )
        dns = BackgroundDns(view)
        dns.start(str(plan.dns_address), 53)
        stack.callback(dns.stop)
        yield Topology(network, *machines, world, published_port, dns)


def test_same_org_reaches_each_other(topo: Topology) -> None:
    assert topo.a1.ping(topo.a2.attachment.ip6)
    assert topo.a2.ping(topo.a1.attachment.ip6)


def test_other_org_is_unreachable(topo: Topology) -> None:
    before = firewall.read_counters(topo.network.config.table)["cross_org"]
    assert not topo.a1.ping(topo.b1.attachment.ip6)
    assert not topo.b1.ping(topo.a1.attachment.ip6)
    assert firewall.read_counters(topo.network.config.table)["cross_org"] > before


def test_spoofed_source_address_is_dropped(topo: Topology) -> None:
    table = topo.network.config.table
    spoofed = topo.network.plan.machine_address(
        topo.a1.attachment.org_number, topo.network.config.host_number, "not-a-machine"
    )
    topo.a1.sh("ip", "-6", "addr", "add", f"{spoofed}/128", "dev", "eth0")
    try:
        before = firewall.read_counters(table)["spoofed"]
        assert not topo.a1.ping(topo.a2.attachment.ip6, source=spoofed)
        assert firewall.read_counters(table)["spoofed"] > before
        assert topo.a1.ping(topo.a2.attachment.ip6, source=topo.a1.attachment.ip6)
    finally:
        topo.a1.sh("ip", "-6", "addr", "del", f"{spoofed}/128", "dev", "eth0")


def test_spoofed_mac_is_dropped(topo: Topology) -> None:
    mac = topo.a1.attachment.mac
    topo.a1.sh("ip", "link", "set", "eth0", "address", "06:00:00:00:00:42")
    try:
        assert not topo.a1.ping(topo.a2.attachment.ip6)
    finally:
        topo.a1.sh("ip", "link", "set", "eth0", "address", mac)
    assert topo.a1.ping(topo.a2.attachment.ip6)


def test_host_ports_are_closed_but_dns_and_published_ports_are_open(topo: Topology) -> None:
    plan = topo.network.plan
    with http_listener("host") as port:
        for address in (f"[{plan.dns_address}]", str(plan.egress_gateway)):
            assert topo.a1.fetch(f"http://{address}:{port}/") is None
        published = topo.a1.fetch(f"http://[{plan.dns_address}]:{topo.published_port}/")
        assert published is not None and published.startswith("published saw ")
    assert firewall.read_counters(topo.network.config.table)["host_blocked"] > 0


def test_dns_answers_own_org_only(topo: Topology) -> None:
    dns = str(topo.network.plan.dns_address)
    own = topo.a1.sh("busybox", "nslookup", "-type=AAAA", "web.internal", dns)
    assert own.returncode == 0, own.stdout + own.stderr
    assert str(topo.a2.attachment.ip6) in own.stdout
    assert str(topo.a1.attachment.ip6) in own.stdout
    other = topo.b1.sh("busybox", "nslookup", "-type=AAAA", "web.internal", dns)
    assert "NXDOMAIN" in other.stdout + other.stderr
    assert str(topo.a2.attachment.ip6) not in other.stdout


def test_egress_is_masqueraded_to_the_egress_interface(topo: Topology) -> None:
    far = topo.outside.far_side.ip
    with ns_http_listener(topo.outside.ns, far, 8080):
        seen = None
        for _ in range(50):  # busybox httpd takes a moment to listen
            seen = topo.b1.fetch(f"http://{far}:8080/cgi-bin/peer")
            if seen is not None:
                break
        assert seen == f"outside saw {topo.outside.host_side.ip}\n"


def test_a_tap_the_rules_do_not_list_yet_passes_nothing(topo: Topology) -> None:
    network = topo.network
    stray = network.attachment("stray" + secrets.token_hex(4), topo.a1.attachment.org_number)
    before = firewall.read_counters(network.config.table)["spoofed"]
    with ns_machine(stray, network.bridge, network.plan) as machine:
        assert not machine.ping(topo.a1.attachment.ip6)
    assert firewall.read_counters(network.config.table)["spoofed"] > before
