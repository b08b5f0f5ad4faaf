"""Real guests on hangar's private network: QEMU (TCG) machines booted by hangar's driver with
hangar's kernel, initrd and init, each on a tap made by ``HostNetwork``, behind the ruleset it
renders, asking the internal DNS server on the bridge.

Org A runs ``web`` (busybox httpd) and ``client-a``; org B runs ``client-b``. The clients run
their checks as their process and print one ``hangar-check NAME ok|failed OUTPUT`` line each;
three boots serve every test here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from hangar.images.build import build_busybox_image
from hangar.images.initramfs import ensure_base_initramfs, machine_initrd
from hangar.images.kernel import ensure_kernel
from hangar.images.reference import parse_image_ref
from hangar.images.rootfs import CachedImage, ImageCache, machine_disk
from hangar.images.run_config import GuestRunConfig
from hangar.model.machine import new_machine_id
from hangar.net import firewall, links
from hangar.net.attachment import Attachment
from hangar.net.dns import DnsMachine, SnapshotView
from hangar.net.host import HostNetwork
from hangar.vmm.control import read_control_events
from hangar.vmm.driver import VmHandle, VmSpec
from hangar.vmm.qemu import QemuDriver
from hangar.vmm.qemu_argv import QEMU_BINARY
from tests.conftest import SUITE_CACHE
from tests.net.netenv import unique_config, unique_ipv4_subnet
from tests.net.netns import BackgroundDns, Outside, http_listener, ns_http_listener, outside

pytestmark = pytest.mark.slow

ORG_A, ORG_B = "org-a", "org-b"
REGION = "ams"
WEB_PORT = 8080
OUTSIDE_PORT = 8080
# Bounds a guest's whole run; no result depends on it.
GUEST_DEADLINE_S = 240.0
CHECK_LINE = re.compile(r"^hangar-check (\S+) (ok|failed)(.*)$")

CHECK_FUNCTIONS = r"""
check() {
	name=$1
	shift
	if out=$("$@" 2>&1); then
		echo "hangar-check $name ok $(echo $out)"
	else
		echo "hangar-check $name failed $(echo $out)"
	fi
}
fetch() {
	timeout -s KILL 4 wget -q -O - "$1"
}
"""


@dataclass(frozen=True)
class Guest:
    name: str
    attachment: Attachment
    handle: VmHandle
    run_dir: Path

    @property
    def console(self) -> str:
        return (self.run_dir / "console.log").read_text(errors="replace")

    def checks(self) -> dict[str, tuple[bool, str]]:
        found: dict[str, tuple[bool, str]] = {}
        for line in self.console.splitlines():
            match = CHECK_LINE.match(line.strip())
            if match:
                found[match.group(1)] = (match.group(2) == "ok", match.group(3).strip())
        return found


@dataclass(frozen=True)
class Fleet:
    network: HostNetwork
    web: Guest
    client_a: Guest
    client_b: Guest
    world: Outside
    host_port: int
    published_port: int
    spoofed: IPv6Address
    counters: dict[str, int]


def _wait_for(done: object, what: str, deadline_s: float = GUEST_DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.1)


def _exited(guest: Guest) -> bool:
    return any(e["type"] == "exit" for e in read_control_events(guest.run_dir / "ctl.jsonl"))


def _serves(address: IPv6Address, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://[{address}]:{port}/", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def client_a_script(fleet: dict[str, str]) -> str:
    return (
        CHECK_FUNCTIONS
        + f"""
check lookup_app nslookup web.internal
check fetch_by_name fetch http://web.internal:{WEB_PORT}/
check fetch_by_address fetch http://[{fleet["web_ip"]}]:{WEB_PORT}/
check lookup_vm nslookup -type=AAAA {fleet["web_id"]}.vm.web.internal
check lookup_region nslookup -type=AAAA {REGION}.web.internal
check lookup_nearest nslookup -type=AAAA top1.nearest.of.web.internal
check lookup_apps nslookup -type=TXT _apps.internal
check host_port_v6 fetch http://[{fleet["dns"]}]:{fleet["host_port"]}/
check host_port_v4 fetch http://{fleet["gw4"]}:{fleet["host_port"]}/
check published_port fetch http://[{fleet["dns"]}]:{fleet["published_port"]}/
check resolv_conf cat /etc/resolv.conf
check hosts_file cat /etc/hosts
ip -6 addr add {fleet["spoofed"]}/128 dev eth0
check ping_spoofed ping -c 1 -W 3 -I {fleet["spoofed"]} {fleet["web_ip"]}
ip -6 addr del {fleet["spoofed"]}/128 dev eth0
check ping_own ping -c 1 -W 3 {fleet["web_ip"]}
"""
    )


def client_b_script(fleet: dict[str, str]) -> str:
    return (
        CHECK_FUNCTIONS
        + f"""
check lookup_other_org nslookup web.internal
check fetch_other_org fetch http://[{fleet["web_ip"]}]:{WEB_PORT}/
check ping_other_org ping -c 1 -W 3 {fleet["web_ip"]}
check lookup_apps nslookup -type=TXT _apps.internal
check egress fetch http://{fleet["far"]}:{OUTSIDE_PORT}/cgi-bin/peer
"""
    )


def _boot(
    network: HostNetwork,
    driver: QemuDriver,
    image: CachedImage,
    name: str,
    machine_id: str,
    org_number: int,
    argv: list[str],
    base: Path,
) -> Guest:
    attachment = network.create_port(machine_id, org_number)
    run_dir = base / name
    run_dir.mkdir()
    config = GuestRunConfig(machine_id=machine_id, argv=argv, hostname=machine_id)
    kernel = ensure_kernel(SUITE_CACHE)
    initrd = machine_initrd(ensure_base_initramfs(kernel, SUITE_CACHE), config, run_dir / "initrd")
    spec = VmSpec.in_run_dir(
        machine_id=machine_id,
        run_dir=run_dir,
        kernel=kernel.vmlinuz,
        initrd=initrd,
        root_disk=machine_disk(image, run_dir / "root.ext4"),
        kernel_args=network.guest_kernel_args(attachment),
        nic=network.nic(attachment),
    )
    handle = asyncio.run(driver.launch(spec))
    return Guest(name, attachment, handle, run_dir)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which(QEMU_BINARY) is None:
        pytest.skip("guest networking tests need root, nft and QEMU")
    layout = tmp_path_factory.mktemp("netimage") / "oci"
    build_busybox_image(layout, "net", ["sh"], {})
    image = asyncio.run(ImageCache(SUITE_CACHE).ensure(parse_image_ref(f"oci:{layout}:net")))
    egress_interface = f"hg{secrets.token_hex(3)}e"
    driver = QemuDriver()
    guests: list[Guest] = []
    base = Path(tempfile.mkdtemp(prefix="hgnet-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, True)
        host_port = stack.enter_context(http_listener("host"))
        published_port = stack.enter_context(http_listener("published"))
        world = stack.enter_context(outside(egress_interface, unique_ipv4_subnet(30)))
        config = dataclasses.replace(
            unique_config(egress_interface=egress_interface),
            published_tcp=frozenset({published_port}),
        )
        network = HostNetwork(config)
        stack.callback(_assert_torn_down, network)
        stack.callback(network.teardown)

        def kill_guests() -> None:
            for guest in guests:
                asyncio.run(driver.kill(guest.handle))

        stack.callback(kill_guests)
        plan = config.plan
        org_a = plan.org_number(ORG_A)
        org_b = plan.org_number(ORG_B, {org_a: ORG_A})
        ids = {name: new_machine_id() for name in ("web", "client-a", "client-b")}
        network.ensure_bridge()
        network.apply_rules()

        web_argv = [
            "sh",
            "-c",
            f"mkdir -p /www && echo hello-from-web >/www/index.html && "
            f"exec httpd -f -p {WEB_PORT} -h /www",
        ]
        guests.append(_boot(network, driver, image, "web", ids["web"], org_a, web_argv, base))
        web = guests[0]
        network.apply_rules()
        _wait_for(lambda: _serves(web.attachment.ip6, WEB_PORT), "web's httpd")

        spoofed = plan.machine_address(org_a, config.host_number, "nobody-" + ids["client-a"])
        values = {
            "web_ip": str(web.attachment.ip6),
            "web_id": ids["web"],
            "dns": str(plan.dns_address),
            "gw4": str(plan.egress_gateway),
            "host_port": str(host_port),
            "published_port": str(published_port),
            "spoofed": str(spoofed),
            "far": str(world.far_side.ip),
        }
        attachments = {
            name: network.attachment(machine_id, org_a if name != "client-b" else org_b)
            for name, machine_id in ids.items()
        }
        view = SnapshotView(
            {ORG_A: ["web", "client"], ORG_B: ["other"]},
            [
                DnsMachine(ids["web"], "web", ORG_A, REGION, "h1", web.attachment.ip6, True),
                DnsMachine(
                    ids["client-a"], "client", ORG_A, REGION, "h1",
                    attachments["client-a"].ip6, True,
                ),
                DnsMachine(
                    ids["client-b"], "other", ORG_B, REGION, "h1",
                    attachments["client-b"].ip6, True,
                ),
            ],
        )  # fmt: skip
        dns = BackgroundDns(view)
        dns.start(str(plan.dns_address), 53)
        stack.callback(dns.stop)
        stack.enter_context(ns_http_listener(world.ns, world.far_side.ip, OUTSIDE_PORT))

        client_a = _boot(
            network, driver, image, "client-a", ids["client-a"], org_a,
            ["sh", "-c", client_a_script(values)], base,
        )  # fmt: skip
        guests.append(client_a)
        client_b = _boot(
            network, driver, image, "client-b", ids["client-b"], org_b,
            ["sh", "-c", client_b_script(values)], base,
        )  # fmt: skip
        guests.append(client_b)
        network.apply_rules()
        for guest in (client_a, client_b):
            _wait_for(lambda g=guest: _exited(g), f"{guest.name} to finish")  # type: ignore[misc]
        yield Fleet(
            network=network,
            web=web,
            client_a=client_a,
            client_b=client_b,
            world=world,
            host_port=host_port,
            published_port=published_port,
            spoofed=spoofed,
            counters=firewall.read_counters(config.table),
        )


def _assert_torn_down(network: HostNetwork) -> None:
    assert network.ports() == []
    assert not firewall.table_exists("inet", network.config.table)
    assert not firewall.table_exists("bridge", network.config.table)
    assert not links.remove_bridge(network.bridge)


def _check(guest: Guest, name: str) -> tuple[bool, str]:
    checks = guest.checks()
    assert name in checks, f"{guest.name} printed no check {name}:\n{guest.console[-3000:]}"
    return checks[name]


def test_same_org_reaches_by_address_and_by_name(fleet: Fleet) -> None:
    web_ip = str(fleet.web.attachment.ip6)
    ok, out = _check(fleet.client_a, "lookup_app")
    assert ok and web_ip in out, out
    for name in ("fetch_by_name", "fetch_by_address"):
        ok, out = _check(fleet.client_a, name)
        assert ok and out == "hello-from-web", (name, out)


def test_dns_names_of_the_org(fleet: Fleet) -> None:
    web_ip = str(fleet.web.attachment.ip6)
    for name in ("lookup_vm", "lookup_region", "lookup_nearest"):
        ok, out = _check(fleet.client_a, name)
        assert ok and web_ip in out, (name, out)
    ok, out = _check(fleet.client_a, "lookup_apps")
    assert ok and "client,web" in out, out
    ok, out = _check(fleet.client_b, "lookup_apps")
    assert ok and "other" in out and "web" not in out, out


def test_guest_network_files(fleet: Fleet) -> None:
    ok, out = _check(fleet.client_a, "resolv_conf")
    assert ok and out == f"nameserver {fleet.network.plan.dns_address}", out
    ok, out = _check(fleet.client_a, "hosts_file")
    assert ok and f"{fleet.client_a.attachment.ip6} {fleet.client_a.attachment.machine_id}" in out
    assert "127.0.1.1" not in out


def test_other_org_cannot_reach_by_address_or_name(fleet: Fleet) -> None:
    ok, out = _check(fleet.client_b, "lookup_other_org")
    assert not ok and "NXDOMAIN" in out and str(fleet.web.attachment.ip6) not in out, out
    for name in ("fetch_other_org", "ping_other_org"):
        ok, out = _check(fleet.client_b, name)
        assert not ok, (name, out)
    assert fleet.counters["cross_org"] > 0


def test_host_ports_are_closed_except_published_ones(fleet: Fleet) -> None:
    for name in ("host_port_v6", "host_port_v4"):
        ok, out = _check(fleet.client_a, name)
        assert not ok and "host saw" not in out, (name, out)
    ok, out = _check(fleet.client_a, "published_port")
    assert ok and out == f"published saw {fleet.client_a.attachment.ip6}", out
    assert fleet.counters["host_blocked"] > 0


def test_spoofed_source_is_dropped(fleet: Fleet) -> None:
    ok, out = _check(fleet.client_a, "ping_spoofed")
    assert not ok, out
    ok, out = _check(fleet.client_a, "ping_own")
    assert ok, out
    assert fleet.counters["spoofed"] > 0


def test_egress_is_masqueraded(fleet: Fleet) -> None:
    ok, out = _check(fleet.client_b, "egress")
    assert ok and out == f"outside saw {fleet.world.host_side.ip}", out
