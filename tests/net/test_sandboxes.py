"""Sandbox-tier machines on hangar's private network: busybox containers under gVisor's runsc
(its own network stack), each in a network namespace of its own behind a veth port made by
``HostNetwork``, behind the ruleset it renders, asking the internal DNS server on the bridge.

Org A runs ``web`` (busybox httpd) and ``client-a``; org B runs ``client-b``. The clients run
their checks as their process and print one ``hangar-check NAME ok|failed OUTPUT`` line each;
three sandbox launches serve every test here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hangar.agent.guest import network_mounts
from hangar.agent.platform import GuestNetwork
from hangar.model.machine import new_machine_id
from hangar.net import links
from hangar.net.attachment import Attachment
from hangar.net.dns import DnsMachine, SnapshotView
from hangar.net.host import HostNetwork
from hangar.net.links import PortKind
from hangar.vmm.container import ContainerSpec
from hangar.vmm.driver import VmHandle, VmSpec
from hangar.vmm.sandbox import (
    SandboxDriver,
    SandboxRuntime,
    SandboxTimeouts,
    find_shims,
    kill_shim,
    rootfs_dir,
    state_root_for,
)
from tests.conftest import RUNSC
from tests.net.netenv import unique_config
from tests.net.netns import BackgroundDns, http_listener
from tests.net.test_guests import (
    CHECK_FUNCTIONS,
    CHECK_LINE,
    REGION,
    WEB_PORT,
    _serves,
    _wait_for,
)

pytestmark = pytest.mark.slow

ORG_A, ORG_B = "org-a", "org-b"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "wget", "timeout", "nslookup", "httpd", "mkdir", "sleep")
SANDBOX_DEADLINE_S = 120.0


@dataclass(frozen=True)
class Sandbox:
    name: str
    attachment: Attachment
    handle: VmHandle
    spec: VmSpec

    @property
    def console(self) -> str:
        return self.spec.console_log.read_text(errors="replace")

    def exited(self) -> bool:
        return (
            '"exit"' in self.spec.control_log.read_text(errors="replace")
            if (self.spec.control_log.exists())
            else False
        )

    def checks(self) -> dict[str, tuple[bool, str]]:
        found: dict[str, tuple[bool, str]] = {}
        for line in self.console.splitlines():
            match = CHECK_LINE.match(line.strip())
            if match:
                found[match.group(1)] = (match.group(2) == "ok", match.group(3).strip())
        return found


@dataclass(frozen=True)
class SandboxFleet:
    network: HostNetwork
    web: Sandbox
    client_a: Sandbox
    client_b: Sandbox
    host_port: int
    published_port: int


def _rootfs(run_dir: Path) -> Path:
    rootfs = rootfs_dir(run_dir)
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, rootfs / "bin/busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc").mkdir()
    (rootfs / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\n")
    return rootfs


def _launch(
    network: HostNetwork,
    driver: SandboxDriver,
    base: Path,
    name: str,
    machine_id: str,
    org_number: int,
    argv: list[str],
) -> Sandbox:
    """What the agent does for a sandbox machine: its veth port, then at boot its namespace's
    addresses, its network files and its NIC."""
    attachment = network.create_port(machine_id, org_number, PortKind.VETH)
    network.apply_rules()
    namespace = network.prepare_namespace(attachment)
    run_dir = base / name
    rootfs = _rootfs(run_dir)
    guest = GuestNetwork(
        nic=network.nic(attachment, namespace.path),
        kernel_args=[],
        etc_files=network.guest_etc_files(attachment, machine_id),
    )
    spec = VmSpec.in_run_dir(
        machine_id=machine_id,
        run_dir=run_dir,
        kernel=None,
        initrd=None,
        root_disk=rootfs,
        channel_sockets=False,
        nic=guest.nic,
        container=ContainerSpec(
            rootfs=rootfs,
            argv=argv,
            hostname=machine_id,
            mounts=network_mounts(run_dir, guest),
        ),
    )
    handle = asyncio.run(driver.launch(spec))
    return Sandbox(name, attachment, handle, spec)


@pytest.fixture(scope="module")
def sandboxes() -> Iterator[SandboxFleet]:
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which(str(RUNSC)) is None:
        pytest.skip("sandbox networking tests need root, nft and runsc (make runsc)")
    base = Path(tempfile.mkdtemp(prefix="hgsbx-"))
    state_root = state_root_for(base, SandboxRuntime.RUNSC)
    driver = SandboxDriver(
        binary=RUNSC, state_root=state_root, timeouts=SandboxTimeouts(launch_s=60)
    )
    launched: list[Sandbox] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, True)
        stack.callback(shutil.rmtree, state_root, True)
        host_port = stack.enter_context(http_listener("host"))
        published_port = stack.enter_context(http_listener("published"))
        config = dataclasses.replace(
            unique_config(egress_interface=None, egress=False),
            published_tcp=frozenset({published_port}),
        )
        network = HostNetwork(config)
        stack.callback(_assert_torn_down, network)
        stack.callback(network.teardown)

        def kill_all() -> None:
            for sandbox in launched:
                asyncio.run(driver.kill(sandbox.handle))
            for pid in find_shims(base):
                kill_shim(pid)

        stack.callback(kill_all)
        plan = config.plan
        org_a = plan.org_number(ORG_A)
        org_b = plan.org_number(ORG_B, {org_a: ORG_A})
        ids = {name: new_machine_id() for name in ("web", "client-a", "client-b")}
        network.ensure_bridge()
        attachments = {
            name: network.attachment(machine_id, org_a if name != "client-b" else org_b)
            for name, machine_id in ids.items()
        }
        view = SnapshotView(
            {ORG_A: ["web", "client"], ORG_B: ["other"]},
            [
                DnsMachine(ids["web"], "web", ORG_A, REGION, "h1", attachments["web"].ip6, True),
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

        web_argv = [
            "sh",
            "-c",
            f"mkdir -p /www && echo hello-from-web >/www/index.html && "
            f"exec httpd -f -p [::]:{WEB_PORT} -h /www",
        ]
        web = _launch(network, driver, base, "web", ids["web"], org_a, web_argv)
        launched.append(web)
        _wait_for(lambda: _serves(web.attachment.ip6, WEB_PORT), "web's httpd", SANDBOX_DEADLINE_S)

        web_ip, dns_ip = attachments["web"].ip6, plan.dns_address
        client_a_script = (
            CHECK_FUNCTIONS
            + f"""
check lookup_app nslookup web.internal
check fetch_by_name fetch http://web.internal:{WEB_PORT}/
check fetch_by_address fetch http://[{web_ip}]:{WEB_PORT}/
check host_port fetch http://[{dns_ip}]:{host_port}/
check published_port fetch http://[{dns_ip}]:{published_port}/
check resolv_conf cat /etc/resolv.conf
check hosts_file cat /etc/hosts
"""
        )
        client_b_script = (
            CHECK_FUNCTIONS
            + f"""
check lookup_other_org nslookup web.internal
check fetch_other_org fetch http://[{web_ip}]:{WEB_PORT}/
check published_port fetch http://[{dns_ip}]:{published_port}/
"""
        )
        client_a = _launch(
            network, driver, base, "client-a", ids["client-a"], org_a,
            ["sh", "-c", client_a_script],
        )  # fmt: skip
        launched.append(client_a)
        client_b = _launch(
            network, driver, base, "client-b", ids["client-b"], org_b,
            ["sh", "-c", client_b_script],
        )  # fmt: skip
        launched.append(client_b)
        for sandbox in (client_a, client_b):
            _wait_for(sandbox.exited, f"{sandbox.name} to finish", SANDBOX_DEADLINE_S)
        yield SandboxFleet(network, web, client_a, client_b, host_port, published_port)


def _assert_torn_down(network: HostNetwork) -> None:
    assert network.ports() == []
    assert links.list_namespaces(network.config.names) == []


def test_sandboxes_have_veth_ports_in_namespaces_of_their_own(sandboxes: SandboxFleet) -> None:
    names = sandboxes.network.config.names
    ports = {port.name: port for port in sandboxes.network.ports()}
    for sandbox in (sandboxes.web, sandboxes.client_a, sandboxes.client_b):
        port = ports[sandbox.attachment.tap]
        assert port.kind is PortKind.VETH and port.attachment == sandbox.attachment
        assert sandbox.spec.nic is not None
        assert sandbox.spec.nic.netns == links.NETNS_DIR / names.netns(
            sandbox.attachment.machine_id
        )
    config = (sandboxes.web.spec.run_dir / "bundle/config.json").read_text()
    assert str(sandboxes.web.spec.nic.netns) in config  # type: ignore[union-attr]


def test_same_org_reaches_by_name_and_address(sandboxes: SandboxFleet) -> None:
    checks = sandboxes.client_a.checks()
    assert checks["fetch_by_address"][0] and "hello-from-web" in checks["fetch_by_address"][1]
    assert checks["lookup_app"][0] and str(sandboxes.web.attachment.ip6) in checks["lookup_app"][1]
    assert checks["fetch_by_name"][0] and "hello-from-web" in checks["fetch_by_name"][1]


def test_another_org_does_not_reach(sandboxes: SandboxFleet) -> None:
    checks = sandboxes.client_b.checks()
    assert checks["fetch_other_org"][0] is False
    assert str(sandboxes.web.attachment.ip6) not in checks["lookup_other_org"][1]
    assert checks["published_port"][0]  # the client ran, and its network works


def test_host_ports_are_closed_but_published_ones(sandboxes: SandboxFleet) -> None:
    checks = sandboxes.client_a.checks()
    assert checks["host_port"][0] is False
    assert checks["published_port"][0] and "published saw" in checks["published_port"][1]
    assert str(sandboxes.client_a.attachment.ip6) in checks["published_port"][1]


def test_the_network_files_name_the_dns_service_and_the_machine(sandboxes: SandboxFleet) -> None:
    checks = sandboxes.client_a.checks()
    dns = sandboxes.network.plan.dns_address
    assert checks["resolv_conf"] == (True, f"nameserver {dns}")
    ok, hosts = checks["hosts_file"]
    assert (
        ok
        and f"{sandboxes.client_a.attachment.ip6} {sandboxes.client_a.attachment.machine_id}"
        in hosts
    )
