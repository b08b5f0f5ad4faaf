"""One host's private network, as the agent's steps use it: the bridge, a port per machine
(a VM's tap, or a sandbox machine's veth into a network namespace of its own), the ruleset,
and reconciliation. Each operation has a check ("should I run?") and is safe to repeat after a
crash at any point.

The ports are the record of which machine is attached (their aliases hold the attachments),
and the ruleset is always rendered from the ports that exist, so a port and its rules can never
be owned by different records; a namespace is kept only for a machine a record owns.
Settings (``HANGAR_NET_*``): :meth:`HostNetConfig.from_settings`.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Address, IPv6Interface
from pathlib import Path

from hangar.errors import NetworkError
from hangar.net import firewall, links
from hangar.net.addressing import (
    GATEWAY_LINK_LOCAL,
    HOST_PREFIX_LEN,
    LINK_LOCAL_PREFIX_LEN,
    AddressPlan,
    bridge_mac,
    check_host_number,
    host_number,
    machine_mac,
)
from hangar.net.attachment import Attachment
from hangar.net.guest import guest_etc_files, guest_kernel_args
from hangar.net.links import (
    BridgeConfig,
    LinkNames,
    NamespaceConfig,
    PeerRoute,
    PortKind,
    PortState,
)
from hangar.settings import Settings
from hangar.vmm.driver import NicSpec

DEFAULT_TABLE = "hangar"


@dataclass(frozen=True)
class HostNetConfig:
    host_number: int
    plan: AddressPlan = field(default_factory=AddressPlan)
    names: LinkNames = field(default_factory=LinkNames)
    table: str = DEFAULT_TABLE
    egress: bool = True
    egress_interface: str | None = None
    """None with egress on: the interface of the host's default route, looked up when the
    ruleset is rendered."""
    dns_port: int = 53
    published_tcp: frozenset[int] = frozenset()
    published_udp: frozenset[int] = frozenset()
    underlay: IPv6Address | None = None
    """This host's address on the network between a fleet's hosts, where the others route
    the private prefixes it holds (None: the private network stays on this host)."""

    def __post_init__(self) -> None:
        check_host_number(self.host_number)

    @classmethod
    def from_settings(cls, settings: Settings) -> HostNetConfig:
        """The operator's ``HANGAR_NET_*`` settings for this host (its number from its id
        unless ``HANGAR_NET_HOST_NUMBER`` says)."""
        return cls(
            host_number=settings.net_host_number or host_number(settings.host_id),
            plan=AddressPlan.parse(settings.net_prefix, settings.net_egress_subnet),
            names=LinkNames(settings.net_link_prefix),
            table=settings.net_table,
            egress=settings.net_egress,
            egress_interface=settings.net_egress_interface,
            published_tcp=settings.net_published_tcp,
            underlay=_underlay(settings.net_underlay),
        )


def _underlay(text: str) -> IPv6Address | None:
    if not text:
        return None
    try:
        return IPv6Address(text)
    except ValueError as exc:
        raise NetworkError(
            f"the underlay address {text!r} is not an IPv6 address",
            retryable=False,
            setting="net_underlay",
        ) from exc


@dataclass(frozen=True)
class ReconcileReport:
    removed_ports: list[str]
    """Ports no record owned, or half-made ones, now gone."""
    rules_applied: bool
    removed_namespaces: list[str] = field(default_factory=list)
    """Network namespaces no record owned, now gone."""


class HostNetwork:
    """The agent's handle on this host's private network."""

    def __init__(self, config: HostNetConfig) -> None:
        self.config = config
        self.peers: frozenset[IPv6Address] = frozenset()
        """The fleet's other hosts (their underlay addresses), as last set."""
        self.peer_routes: frozenset[PeerRoute] = frozenset()

    @property
    def plan(self) -> AddressPlan:
        return self.config.plan

    @property
    def bridge(self) -> str:
        return self.config.names.bridge

    # the bridge
    def bridge_config(self) -> BridgeConfig:
        plan = self.plan
        addresses: list[IPv4Interface | IPv6Interface] = [
            IPv6Interface(f"{GATEWAY_LINK_LOCAL}/{LINK_LOCAL_PREFIX_LEN}"),
            IPv6Interface(f"{plan.dns_address}/128"),
        ]
        if self.config.egress:
            addresses.append(IPv4Interface(f"{plan.egress_gateway}/{plan.egress_subnet.prefixlen}"))
        sysctls = {}
        egress_interface = self.egress_interface()
        if egress_interface is not None:
            # Replies to egress come in there and are forwarded to the bridge.
            sysctls[f"ipv4/conf/{egress_interface}/forwarding"] = "1"
        if self.config.underlay is not None:
            # Guests' packets to and from their org's machines on other hosts are routed.
            sysctls["ipv6/conf/all/forwarding"] = "1"
        return BridgeConfig(
            name=self.bridge,
            mac=bridge_mac(self.config.host_number),
            addresses=addresses,
            routes=[plan.ula_prefix],
            ipv4_forwarding=self.config.egress,
            sysctls=sysctls,
        )

    def egress_interface(self) -> str | None:
        """Where egress leaves (None: egress is off, or the host has no default route)."""
        if not self.config.egress:
            return None
        return self.config.egress_interface or links.default_route_interface()

    def bridge_present(self) -> bool:
        """Is the bridge there at all (whatever its state)?"""
        return links.link_exists(self.bridge)

    def bridge_ready(self) -> bool:
        return links.bridge_ready(self.bridge_config())

    def ensure_bridge(self) -> None:
        links.ensure_bridge(self.bridge_config())

    # ports
    def ports(self) -> list[PortState]:
        return links.list_ports(self.config.names)

    def attachments(self) -> list[Attachment]:
        """The machines attached now: whole ports on this host's bridge."""
        return [
            port.attachment
            for port in self.ports()
            if port.attachment is not None and port.master == self.bridge
        ]

    def attachment(self, machine_id: str, org_number: int) -> Attachment:
        """Where the machine is (or would be) attached. Its port, MAC and ``private_ip``
        follow from its id, org and this host; its egress address is kept while its port
        exists and otherwise chosen past the other ports' addresses."""
        tap = self.config.names.tap(machine_id)
        ip6 = self.plan.machine_address(org_number, self.config.host_number, machine_id)
        ip4 = None
        if self.config.egress:
            current = links.port_state(tap)
            held = current.attachment if current is not None else None
            if (
                held is not None
                and held.machine_id == machine_id
                and held.ip4 is not None
                and held.ip4 in self.plan.egress_subnet
            ):
                ip4 = held.ip4
            else:
                taken = [
                    a.ip4
                    for a in self.attachments()
                    if a.ip4 is not None and a.machine_id != machine_id
                ]
                ip4 = self.plan.egress_address(machine_id, taken)
        return Attachment(
            machine_id=machine_id,
            org_number=org_number,
            tap=tap,
            mac=machine_mac(machine_id),
            ip6=ip6,
            ip4=ip4,
        )

    def namespace(self, attachment: Attachment) -> NamespaceConfig:
        """A sandbox machine's namespace and its ``eth0``'s addresses and routes (what a VM's
        init is told on its kernel command line)."""
        plan = self.plan
        ip4 = gateway4 = None
        if attachment.ip4 is not None:
            ip4 = IPv4Interface(f"{attachment.ip4}/{plan.egress_subnet.prefixlen}")
            gateway4 = plan.egress_gateway
        return NamespaceConfig(
            name=self.config.names.netns(attachment.machine_id),
            ip6=IPv6Interface(f"{attachment.ip6}/{HOST_PREFIX_LEN}"),
            gateway6=GATEWAY_LINK_LOCAL,
            ip4=ip4,
            gateway4=gateway4,
        )

    def _namespace_for(self, attachment: Attachment, kind: PortKind) -> NamespaceConfig | None:
        return self.namespace(attachment) if kind is PortKind.VETH else None

    def port_ready(self, machine_id: str, org_number: int, kind: PortKind = PortKind.TAP) -> bool:
        attachment = self.attachment(machine_id, org_number)
        return links.port_ready(
            attachment, self.bridge, kind, self._namespace_for(attachment, kind)
        )

    def create_port(
        self, machine_id: str, org_number: int, kind: PortKind = PortKind.TAP
    ) -> Attachment:
        """Create (or repair) the machine's port on the bridge; return its attachment.
        Raises :class:`NetworkError` if another attached machine has the same address."""
        attachment = self.attachment(machine_id, org_number)
        others = [a for a in self.attachments() if a.machine_id != machine_id]
        firewall.check_attachments([*others, attachment])
        links.create_port(attachment, self.bridge, kind, self._namespace_for(attachment, kind))
        return attachment

    def remove_port(self, machine_id: str) -> bool:
        """The machine's port, whichever kind, and its namespace if it has one."""
        names = self.config.names
        return links.remove_port(names.tap(machine_id), names.netns(machine_id))

    def prepare_namespace(self, attachment: Attachment) -> NamespaceConfig:
        """Before a sandbox boot: its namespace's addresses and routes back (the last boot's
        netstack took them); return the namespace."""
        namespace = self.namespace(attachment)
        links.configure_namespace(namespace)
        return namespace

    # rules
    def policy(self, attached: Sequence[Attachment]) -> firewall.FirewallPolicy:
        egress_interface = self.egress_interface()
        return firewall.FirewallPolicy(
            table=self.config.table,
            bridge=self.bridge,
            tap_head=self.config.names.tap_head,
            dns_address=self.plan.dns_address,
            dns_port=self.config.dns_port,
            org_prefixes={a.org_number: self.plan.org_prefix(a.org_number) for a in attached},
            egress_interface=egress_interface,
            egress_subnet=self.plan.egress_subnet if egress_interface is not None else None,
            published_tcp=self.config.published_tcp,
            published_udp=self.config.published_udp,
            underlay_interface=self.underlay_interface(),
            peers=self.peers,
        )

    def underlay_interface(self) -> str | None:
        """The interface holding this host's underlay address (None: no fleet network, or the
        address is on no interface yet)."""
        if self.config.underlay is None:
            return None
        return links.interface_holding(self.config.underlay)

    # the fleet
    def set_fleet(self, peers: frozenset[IPv6Address], routes: frozenset[PeerRoute]) -> None:
        """The fleet's other hosts and the routes to the private prefixes they hold: routes
        made exactly these, and the ruleset current with them (safe to repeat)."""
        self.peers = peers
        self.peer_routes = routes
        if links.peer_routes() != set(routes):
            links.sync_peer_routes(routes)
        if not self.rules_current():
            self.apply_rules()

    def render_rules(self, attached: Sequence[Attachment] | None = None) -> str:
        """The ruleset for ``attached`` (default: the machines whose ports exist now)."""
        machines = self.attachments() if attached is None else attached
        return firewall.render_ruleset(self.policy(machines), machines)

    def rules_current(self) -> bool:
        return firewall.ruleset_current(self.config.table, self.render_rules())

    def apply_rules(self) -> None:
        """Replace the ruleset with one rendered from the ports there are now."""
        firewall.apply_ruleset(self.render_rules())

    def dns_endpoint(self) -> tuple[str, int]:
        """Where the host's DNS service listens (on the bridge: after :meth:`ensure_bridge`)."""
        return str(self.plan.dns_address), self.config.dns_port

    # the guest's view
    def nic(self, attachment: Attachment, namespace: Path | None = None) -> NicSpec:
        """The NIC a boot gets: a VM's tap, or a sandbox's namespace (``namespace``: its
        path, which the container's runtime joins)."""
        return NicSpec(tap=attachment.tap, mac=attachment.mac, netns=namespace)

    def guest_kernel_args(self, attachment: Attachment) -> list[str]:
        return guest_kernel_args(attachment, self.plan)

    def guest_etc_files(self, attachment: Attachment, hostname: str) -> dict[str, str]:
        """A sandbox machine's ``/etc/resolv.conf`` and ``/etc/hosts`` (a VM's init writes
        the same from its kernel arguments)."""
        return guest_etc_files(attachment, self.plan, hostname)

    # recovery
    def reconcile(self, owned: Set[str]) -> ReconcileReport:
        """After an agent start: bring the bridge back, remove every port no record owns
        (``owned``: ids of the machines that should be attached) and every half-made one, put
        owned ports that fell off the bridge back on it, remove every network namespace no
        owned machine's veth (or port to come) needs, and load the ruleset for what remains."""
        self.ensure_bridge()
        names = self.config.names
        removed: list[str] = []
        taps: dict[str, PortKind] = {}
        for port in self.ports():
            attachment = port.attachment
            if (
                attachment is None
                or attachment.machine_id not in owned
                or attachment.tap != port.name
            ):
                if links.remove_port(port.name):
                    removed.append(port.name)
                continue
            taps[attachment.machine_id] = port.kind
            if port.master != self.bridge or not port.up:
                links.create_port(
                    attachment, self.bridge, port.kind, self._namespace_for(attachment, port.kind)
                )
        needed = {
            names.netns(machine_id)
            for machine_id in owned
            if taps.get(machine_id, PortKind.VETH) is PortKind.VETH
        }
        removed_namespaces = [
            name
            for name in links.list_namespaces(names)
            if name not in needed and links.remove_namespace(name)
        ]
        applied = not self.rules_current()
        if applied:
            self.apply_rules()
        return ReconcileReport(
            removed_ports=removed, rules_applied=applied, removed_namespaces=removed_namespaces
        )

    def teardown(self) -> None:
        """Remove every port and namespace, the peer routes, the ruleset and the bridge (tests,
        and a host leaving service)."""
        for port in self.ports():
            links.remove_port(port.name)
        for name in links.list_namespaces(self.config.names):
            links.remove_namespace(name)
        if self.config.underlay is not None:
            links.sync_peer_routes(set())
        firewall.remove_ruleset(self.config.table)
        links.remove_bridge(self.bridge)
