"""This host's private network as the agent uses it: a machine's port (a VM's tap, a sandbox
machine's veth into its own network namespace) and the ruleset around its boots, the internal
DNS service, and reconciliation after a restart.

Ports and rules are changed one machine at a time (a lock): the ruleset is rendered from the
ports that exist, so two machines attaching at once must not each load a ruleset that lacks
the other. Netlink and ``nft`` calls are quick but blocking, so they run in a thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Set
from ipaddress import IPv6Address

from hangar.agent.platform import GuestNetwork
from hangar.clock import Clock
from hangar.errors import NetworkError
from hangar.model.machine import Machine
from hangar.net import links
from hangar.net.attachment import Attachment
from hangar.net.dns import DnsServer, SnapshotView, dns_record, view_from_records
from hangar.net.host import HostNetwork
from hangar.net.links import PeerRoute, PortKind, port_kind

log = logging.getLogger(__name__)


class MachineNetwork:
    def __init__(self, net: HostNetwork, clock: Clock) -> None:
        self.net = net
        self._clock = clock
        self._lock = asyncio.Lock()
        self.dns: DnsServer | None = None

    # addresses
    @property
    def host_number(self) -> int:
        return self.net.config.host_number

    def private_ip(self, org_number: int, machine_id: str) -> str:
        """The machine's address: stable for its org, this host and its id."""
        return str(self.net.plan.machine_address(org_number, self.host_number, machine_id))

    def org_number_of(self, machine: Machine) -> int:
        if not machine.private_ip:
            raise NetworkError(
                f"machine {machine.id} has no private address", retryable=False, machine=machine.id
            )
        number = self.net.plan.org_of(IPv6Address(machine.private_ip))
        if number is None:
            raise NetworkError(
                f"machine {machine.id}'s address {machine.private_ip} is outside this host's "
                "private network",
                retryable=False,
                machine=machine.id,
            )
        return number

    def attachment(self, machine: Machine) -> Attachment:
        return self.net.attachment(machine.id, self.org_number_of(machine))

    # a machine's port and the rules (pyroute2's calls run their own event loop: a thread each)
    async def attached(self, machine: Machine) -> bool:
        org_number = self.org_number_of(machine)
        kind = port_kind(machine.tier)
        return await asyncio.to_thread(
            lambda: self.net.port_ready(machine.id, org_number, kind) and self.net.rules_current()
        )

    async def attach(self, machine: Machine) -> Attachment:
        org_number = self.org_number_of(machine)
        async with self._lock:
            return await asyncio.to_thread(
                self._attach, machine.id, org_number, port_kind(machine.tier)
            )

    def _attach(self, machine_id: str, org_number: int, kind: PortKind) -> Attachment:
        if not self.net.bridge_ready():
            self.net.ensure_bridge()
        attachment = self.net.create_port(machine_id, org_number, kind)
        if not self.net.rules_current():
            self.net.apply_rules()
        return attachment

    async def has_port(self, machine_id: str) -> bool:
        """Whether the machine has a port, or a namespace, to remove."""
        names = self.net.config.names

        def found() -> bool:
            ports = self.net.ports()
            return any(port.name == names.tap(machine_id) for port in ports) or (
                links.namespace_exists(names.netns(machine_id))
            )

        return await asyncio.to_thread(found)

    async def detach(self, machine_id: str) -> None:
        async with self._lock:
            await asyncio.to_thread(self._detach, machine_id)

    def _detach(self, machine_id: str) -> None:
        self.net.remove_port(machine_id)
        # Without a bridge (the network was taken down) no rules are owed; loading them would
        # leave tables no bridge uses (the next start's reconcile makes both).
        if self.net.bridge_present() and not self.net.rules_current():
            self.net.apply_rules()

    async def set_fleet(self, peers: frozenset[IPv6Address], routes: frozenset[PeerRoute]) -> None:
        """The fleet's other hosts and the routes to their machines' prefixes (a fleet's agent
        calls this whenever either changes)."""
        async with self._lock:
            await asyncio.to_thread(self.net.set_fleet, peers, routes)

    async def guest_network(self, machine: Machine) -> GuestNetwork:
        """The NIC a boot of ``machine`` gets (its port must exist): a VM's tap and the kernel
        arguments its init reads; a sandbox machine's namespace, its addresses and routes put
        back for this boot, and its ``/etc/resolv.conf`` and ``/etc/hosts``."""
        attachment = await asyncio.to_thread(self.attachment, machine)
        if port_kind(machine.tier) is PortKind.TAP:
            return GuestNetwork(
                nic=self.net.nic(attachment), kernel_args=self.net.guest_kernel_args(attachment)
            )
        async with self._lock:
            namespace = await asyncio.to_thread(self.net.prepare_namespace, attachment)
        return GuestNetwork(
            nic=self.net.nic(attachment, namespace.path),
            kernel_args=[],
            etc_files=self.net.guest_etc_files(attachment, machine.id),
        )

    # the host's side
    async def start(self, owned: Set[str]) -> None:
        """After an agent (re)start: the bridge back, taps no live machine owns removed, the
        ruleset current; then the DNS service on the bridge."""
        async with self._lock:
            report = await asyncio.to_thread(self.net.reconcile, owned)
        if report.removed_ports:
            log.warning("removed ports no live machine owns: %s", report.removed_ports)
        if report.removed_namespaces:
            log.warning(
                "removed network namespaces no live machine owns: %s", report.removed_namespaces
            )
        self.dns = DnsServer(view_from_records({}, []), clock=self._clock)
        await self.dns.start(*self.net.dns_endpoint())

    def refresh_dns(self, app_orgs: Mapping[str, str], machines: Iterable[Machine]) -> None:
        if self.dns is not None:
            self.dns.set_view(view_from_records(app_orgs, machines))

    def refresh_dns_of(self, machine_id: str, machine: Machine | None, org: str | None) -> None:
        """One machine's change (``machine`` None: it is gone; ``org``: its app's org)."""
        if self.dns is None:
            return
        view = self.dns.resolver.view
        record = dns_record(machine, org) if machine is not None else None
        if isinstance(view, SnapshotView):
            view.put(machine_id, record)

    async def close(self) -> None:
        if self.dns is not None:
            await self.dns.stop()
            self.dns = None
