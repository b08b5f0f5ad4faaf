"""Host links through netlink (pyroute2): the bridge and one *port* per machine, each operation
idempotent and paired with a check, so agent steps can ask "should I run?" and then run.

A machine's port is a tap for a VM (QEMU opens it by name) or, for a sandbox machine, a veth
pair whose other end is ``eth0`` in a network namespace of the machine's own (the container's
runtime joins it): :func:`port_kind` decides which. Either way the host end has the same name,
alias and place on the bridge, so the firewall (which matches on names, MACs and addresses)
treats both alike.

Names: every link hangar makes starts with a prefix (``hg`` by default; tests use a random one)
and has at most 15 characters: the bridge is ``PREFIXbr``, a machine's port ``PREFIXt`` followed
by hex digits of a hash of its id, its namespace ``PREFIXn`` and the same digits. A port's
alias holds its :class:`Attachment`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import re
import socket
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_interface,
)
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from hangar.errors import NetworkError
from hangar.model.config import Tier
from hangar.net.attachment import Attachment

IFNAMSIZ = 15
DEFAULT_PREFIX = "hg"
PREFIX_PATTERN = re.compile(r"^hg[a-z0-9]{0,6}$")
IFA_F_NODAD = 0x02
SYSCTL_ROOT = Path("/proc/sys/net")
BRIDGE_ROUTE_METRIC = 256
NETNS_DIR = Path(netns.NETNS_RUN_DIR)
"""Where ``ip netns`` (and pyroute2) keep named network namespaces, one file each."""
NAMESPACE_IFNAME = "eth0"
"""A sandbox machine's interface in its namespace."""


class PortKind(StrEnum):
    """What a machine's port is on the host."""

    TAP = "tap"
    """A tap QEMU opens by name (a VM)."""
    VETH = "veth"
    """A veth pair, its other end ``eth0`` in the machine's network namespace (a sandbox)."""

    @property
    def link_kind(self) -> str:
        """The kernel's name for the host end's kind (``IFLA_INFO_KIND``)."""
        return "tun" if self is PortKind.TAP else "veth"


def port_kind(tier: Tier) -> PortKind:
    """The one place deciding a machine's port: a VM's is a tap, a sandbox machine's a veth
    into its own network namespace."""
    return PortKind.VETH if tier is Tier.SANDBOX else PortKind.TAP


_KIND_OF_LINK = {kind.link_kind: kind for kind in PortKind}


@dataclass(frozen=True)
class LinkNames:
    """The names of hangar's links on this host, from one prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not PREFIX_PATTERN.fullmatch(self.prefix):
            raise NetworkError(
                f"link name prefix {self.prefix!r} must match {PREFIX_PATTERN.pattern}",
                retryable=False,
                setting="link_prefix",
            )

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def tap_head(self) -> str:
        """What every tap's name starts with."""
        return f"{self.prefix}t"

    @property
    def netns_head(self) -> str:
        """What every machine's network namespace name starts with."""
        return f"{self.prefix}n"

    def tap(self, machine_id: str) -> str:
        """The host end of the machine's port (a tap or a veth)."""
        return self.tap_head + self._digits(machine_id)

    def netns(self, machine_id: str) -> str:
        """The sandbox machine's network namespace."""
        return self.netns_head + self._digits(machine_id)

    def _digits(self, machine_id: str) -> str:
        digits = IFNAMSIZ - len(self.tap_head)
        return hashlib.sha256(machine_id.encode()).hexdigest()[:digits]

    def is_netns(self, name: str) -> bool:
        tail = name.removeprefix(self.netns_head)
        return (
            name.startswith(self.netns_head)
            and len(name) == IFNAMSIZ
            and all(ch in "0123456789abcdef" for ch in tail)
        )

    def is_tap(self, name: str) -> bool:
        tail = name.removeprefix(self.tap_head)
        return (
            name.startswith(self.tap_head)
            and len(name) == IFNAMSIZ
            and all(ch in "0123456789abcdef" for ch in tail)
        )


@dataclass(frozen=True)
class BridgeConfig:
    """The host's bridge as it should be."""

    name: str
    mac: str
    addresses: Sequence[IPv4Interface | IPv6Interface]
    routes: Sequence[IPv6Network] = ()
    """On-link routes through the bridge (the private network's prefix)."""
    ipv4_forwarding: bool = False
    """Forward IPv4 that arrives on the bridge (egress); only this interface's switch."""
    sysctls: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PortState:
    name: str
    kind: PortKind
    attachment: Attachment | None
    """None: the port carries no whole alias (a crash between creating and labelling it)."""
    master: str | None
    up: bool


@dataclass(frozen=True)
class NamespaceConfig:
    """A sandbox machine's ``eth0`` in its namespace, as a VM's init would configure its NIC:
    the private address with its on-link prefix, the IPv6 default route through the bridge,
    and the egress address and route where the host has egress."""

    name: str
    ip6: IPv6Interface
    gateway6: IPv6Address
    ip4: IPv4Interface | None = None
    gateway4: IPv4Address | None = None

    @property
    def path(self) -> Path:
        """What the container's runtime joins (the OCI spec's network namespace path)."""
        return NETNS_DIR / self.name


def _fail(action: str, exc: Exception, **fields: Any) -> NetworkError:
    return NetworkError(f"cannot {action}: {exc}", retryable=True, **fields)


@contextlib.contextmanager
def _netlink(action: str, **fields: Any) -> Iterator[IPRoute]:
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise _fail(action, exc, **fields) from exc
    except OSError as exc:
        raise _fail(action, exc, **fields) from exc


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _link(ipr: IPRoute, index: int) -> Any:
    return ipr.get_links(index)[0]


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _is_up(link: Any) -> bool:
    return bool(link["flags"] & 1)


def _names_by_index(ipr: IPRoute) -> dict[int, str]:
    return {int(link["index"]): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def write_sysctl(path: str, value: str, *, root: Path = SYSCTL_ROOT) -> None:
    target = root / path
    try:
        if target.read_text().strip() != value:
            target.write_text(f"{value}\n")
    except OSError as exc:
        raise _fail(f"set net.{path.replace('/', '.')}={value}", exc, sysctl=path) from exc


def _read_sysctl(path: str, *, root: Path = SYSCTL_ROOT) -> str | None:
    try:
        return (root / path).read_text().strip()
    except OSError:
        return None


def _bridge_sysctls(config: BridgeConfig) -> dict[str, str]:
    name = config.name
    return {
        f"ipv6/conf/{name}/accept_ra": "0",
        f"ipv6/conf/{name}/autoconf": "0",
        f"ipv4/conf/{name}/forwarding": "1" if config.ipv4_forwarding else "0",
        **config.sysctls,
    }


def _addresses(ipr: IPRoute, index: int) -> set[IPv4Interface | IPv6Interface]:
    found: set[IPv4Interface | IPv6Interface] = set()
    for message in ipr.get_addr(index=index):
        found.add(ip_interface(f"{message.get_attr('IFA_ADDRESS')}/{message['prefixlen']}"))
    return found


def _routes(ipr: IPRoute, index: int) -> set[IPv6Network]:
    found: set[IPv6Network] = set()
    for message in ipr.get_routes(family=socket.AF_INET6, oif=index):
        dst = message.get_attr("RTA_DST")
        if dst is not None:
            found.add(IPv6Network(f"{dst}/{message['dst_len']}"))
    return found


def link_exists(name: str) -> bool:
    with _netlink("read a link", link=name) as ipr:
        return _index(ipr, name) is not None


def _add_missing_addresses(
    ipr: Any, index: int, wanted: Sequence[IPv4Interface | IPv6Interface]
) -> None:
    """Give link ``index`` each of ``wanted`` it lacks (no duplicate detection: the host's
    rules already vouch for every address)."""
    present = _addresses(ipr, index)
    for address in wanted:
        if address not in present:
            ipr.addr(
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                flags=IFA_F_NODAD,
            )


def bridge_ready(config: BridgeConfig) -> bool:
    """Is the bridge there, up, with its MAC, addresses, routes and switches?"""
    with _netlink("read the bridge", bridge=config.name) as ipr:
        index = _index(ipr, config.name)
        if index is None:
            return False
        link = _link(ipr, index)
        if _kind(link) != "bridge" or not _is_up(link):
            return False
        if link.get_attr("IFLA_ADDRESS") != config.mac:
            return False
        if not set(config.addresses) <= _addresses(ipr, index):
            return False
        if not set(config.routes) <= _routes(ipr, index):
            return False
    return all(_read_sysctl(path) == value for path, value in _bridge_sysctls(config).items())


def ensure_bridge(config: BridgeConfig) -> None:
    """Create the bridge if missing and bring it to ``config`` (safe to repeat)."""
    with _netlink("set up the bridge", bridge=config.name) as ipr:
        index = _index(ipr, config.name)
        if index is None:
            ipr.link("add", ifname=config.name, kind="bridge", address=config.mac)
            index = _index(ipr, config.name)
            assert index is not None
        link = _link(ipr, index)
        if _kind(link) != "bridge":
            raise NetworkError(
                f"{config.name} exists and is not a bridge",
                retryable=False,
                bridge=config.name,
                kind=_kind(link),
            )
        if link.get_attr("IFLA_ADDRESS") != config.mac:
            ipr.link("set", index=index, address=config.mac)
        for path, value in _bridge_sysctls(config).items():
            write_sysctl(path, value)
        ipr.link("set", index=index, state="up")
        _add_missing_addresses(ipr, index, config.addresses)
        for route in config.routes:
            ipr.route(
                "replace",
                dst=str(route),
                oif=index,
                family=socket.AF_INET6,
                priority=BRIDGE_ROUTE_METRIC,
            )


def _remove_link(name: str, kinds: Set[str], what: str) -> bool:
    with _netlink(f"remove {what}", link=name) as ipr:
        index = _index(ipr, name)
        if index is None:
            return False
        if _kind(_link(ipr, index)) not in kinds:
            raise NetworkError(f"{name} is not {what}", retryable=False, link=name)
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            return False
        return True


def remove_bridge(name: str) -> bool:
    """Delete the bridge (its addresses and routes go with it); False if it was not there."""
    return _remove_link(name, {"bridge"}, "a bridge")


# network namespaces (a sandbox machine's)
def namespace_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_namespaces(names: LinkNames) -> list[str]:
    """The network namespaces on this host that carry hangar's names."""
    try:
        entries = sorted(entry.name for entry in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise _fail("list network namespaces", exc) from exc
    return [name for name in entries if names.is_netns(name)]


def create_namespace(name: str) -> None:
    """Create the named network namespace unless it is there (safe to repeat)."""
    if namespace_exists(name):
        return
    try:
        netns.create(name)
    except FileExistsError:
        pass
    except OSError as exc:
        raise _fail("create a network namespace", exc, netns=name) from exc


def remove_namespace(name: str) -> bool:
    """Delete the named network namespace; False if it was not there. (The kernel frees it
    once nothing uses it: a sandbox still running in it keeps it until it ends.)"""
    path = NETNS_DIR / name
    if not path.exists():
        return False
    try:
        netns.remove(name)
    except OSError as exc:
        # A file left by a creation cut short before its bind mount: only the file is there.
        if path.exists():
            try:
                path.unlink()
            except OSError as unlink_exc:
                raise _fail("remove a network namespace", exc, netns=name) from unlink_exc
    return True


@contextlib.contextmanager
def _in_namespace(name: str, action: str) -> Iterator[NetNS]:
    try:
        with NetNS(name, flags=0) as ns:
            yield ns
    except (NetlinkError, OSError) as exc:
        raise _fail(action, exc, netns=name) from exc


def _namespace_holds_peer(config: NamespaceConfig, host_index: int, mac: str) -> bool:
    """Is the peer of the host end ``host_index`` this namespace's ``eth0``, with ``mac``, up,
    beside an up loopback? (Its addresses are not asked: gVisor's netstack takes them off the
    interface when a sandbox starts.)"""
    if not namespace_exists(config.name):
        return False
    with _in_namespace(config.name, "read a machine's network namespace") as ns:
        index = _index(ns, NAMESPACE_IFNAME)
        loopback = _index(ns, "lo")
        if index is None or loopback is None:
            return False
        link = _link(ns, index)
        return (
            link.get_attr("IFLA_LINK") == host_index
            and link.get_attr("IFLA_ADDRESS") == mac
            and _is_up(link)
            and _is_up(_link(ns, loopback))
        )


def configure_namespace(config: NamespaceConfig) -> None:
    """Give the namespace's ``eth0`` its addresses and routes, loopback up (safe to repeat).
    A sandbox under gVisor's netstack takes them at each start, so each boot asks again."""
    with _in_namespace(config.name, "configure a machine's network namespace") as ns:
        index = _index(ns, NAMESPACE_IFNAME)
        loopback = _index(ns, "lo")
        if index is None or loopback is None:
            raise NetworkError(
                f"network namespace {config.name} has no {NAMESPACE_IFNAME}",
                retryable=True,
                netns=config.name,
            )
        ns.link("set", index=loopback, state="up")
        ns.link("set", index=index, state="up")
        wanted: list[IPv4Interface | IPv6Interface] = [config.ip6]
        if config.ip4 is not None:
            wanted.append(config.ip4)
        _add_missing_addresses(ns, index, wanted)
        ns.route(
            "replace", dst="::/0", gateway=str(config.gateway6), oif=index, family=socket.AF_INET6
        )
        if config.ip4 is not None and config.gateway4 is not None:
            ns.route(
                "replace",
                dst="0.0.0.0/0",
                gateway=str(config.gateway4),
                oif=index,
                family=socket.AF_INET,
            )


# machines' ports
def _port_state(ipr: IPRoute, link: Any, names: dict[int, str]) -> PortState | None:
    kind = _KIND_OF_LINK.get(_kind(link) or "")
    if kind is None:
        return None
    master = link.get_attr("IFLA_MASTER")
    return PortState(
        name=link.get_attr("IFLA_IFNAME"),
        kind=kind,
        attachment=Attachment.from_alias(link.get_attr("IFLA_IFALIAS")),
        master=names.get(int(master)) if master is not None else None,
        up=_is_up(link),
    )


def list_ports(names: LinkNames) -> list[PortState]:
    """The machines' ports on this host that carry hangar's names (whatever their alias
    says): taps and veths."""
    with _netlink("list ports") as ipr:
        by_index = _names_by_index(ipr)
        found = []
        for link in ipr.get_links():
            if names.is_tap(link.get_attr("IFLA_IFNAME")):
                state = _port_state(ipr, link, by_index)
                if state is not None:
                    found.append(state)
        return found


def port_state(name: str) -> PortState | None:
    """The port of that name (None: no link, or a link of another kind)."""
    with _netlink("read a port", port=name) as ipr:
        index = _index(ipr, name)
        if index is None:
            return None
        return _port_state(ipr, _link(ipr, index), _names_by_index(ipr))


def port_ready(
    attachment: Attachment, bridge: str, kind: PortKind, namespace: NamespaceConfig | None = None
) -> bool:
    """Is the machine's port there, of ``kind``, labelled with ``attachment``, on ``bridge``
    and up (a veth: with its other end in ``namespace`` as ``eth0``)?"""
    state = port_state(attachment.tap)
    if not (
        state is not None
        and state.kind is kind
        and state.attachment == attachment
        and state.master == bridge
        and state.up
    ):
        return False
    if kind is PortKind.TAP:
        return True
    if namespace is None:
        return False
    with _netlink("read a port", port=attachment.tap) as ipr:
        index = _index(ipr, attachment.tap)
    return index is not None and _namespace_holds_peer(namespace, index, attachment.mac)


def create_port(
    attachment: Attachment, bridge: str, kind: PortKind, namespace: NamespaceConfig | None = None
) -> None:
    """Create the machine's port, label it with the attachment, put it on ``bridge`` and up.
    A tap is persistent, for QEMU to open by name; a veth's other end is ``eth0`` in
    ``namespace`` (made if missing) with the attachment's MAC, and, when the pair is new, its
    addresses and routes (each sandbox boot asks for them again: :func:`configure_namespace`).
    A port of that name left half-made, or of the other kind, is replaced; one that holds
    another machine's attachment is an error."""
    name = attachment.tap
    if kind is PortKind.VETH and namespace is None:
        raise NetworkError(
            f"a veth port for {attachment.machine_id} needs its namespace",
            retryable=False,
            port=name,
        )
    with _netlink("create a port", port=name, machine_id=attachment.machine_id) as ipr:
        bridge_index = _index(ipr, bridge)
        if bridge_index is None:
            raise NetworkError(
                f"bridge {bridge} does not exist", retryable=True, bridge=bridge, port=name
            )
        index = _index(ipr, name)
        if index is not None:
            link = _link(ipr, index)
            held = Attachment.from_alias(link.get_attr("IFLA_IFALIAS"))
            if _kind(link) not in _KIND_OF_LINK or (
                held is not None and held.machine_id != attachment.machine_id
            ):
                raise NetworkError(
                    f"{name} is already another link"
                    + (f" (machine {held.machine_id})" if held is not None else ""),
                    retryable=False,
                    port=name,
                    machine_id=attachment.machine_id,
                )
            if (
                held != attachment
                or _kind(link) != kind.link_kind
                or (
                    namespace is not None
                    and not _namespace_holds_peer(namespace, index, attachment.mac)
                )
            ):
                ipr.link("del", index=index)
                index = None
        fresh = index is None
        if index is None:
            if namespace is None:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            else:
                create_namespace(namespace.name)
                ipr.link(
                    "add",
                    ifname=name,
                    kind="veth",
                    peer={
                        "ifname": NAMESPACE_IFNAME,
                        "net_ns_fd": namespace.name,
                        "address": attachment.mac,
                    },
                )
            index = _index(ipr, name)
            assert index is not None
        # The host end of a port carries no address of its own.
        write_sysctl(f"ipv6/conf/{name}/disable_ipv6", "1")
        ipr.link("set", index=index, ifalias=attachment.alias())
        ipr.link("set", index=index, master=bridge_index, state="up")
    if namespace is not None and fresh:
        # Only on a fresh pair: a sandbox running on a repaired one holds the addresses in
        # its netstack, and the kernel must not answer for them too.
        configure_namespace(namespace)


def remove_port(name: str, namespace: str | None = None) -> bool:
    """Delete a machine's port (a tap or a veth, whose other end goes with it) and, given,
    its network namespace; False if neither was there. A running machine loses its network."""
    removed = _remove_link(name, set(_KIND_OF_LINK), "a machine's port")
    if namespace is not None and remove_namespace(namespace):
        removed = True
    return removed


def default_route_interface() -> str | None:
    """The interface of the host's IPv4 default route (where egress is masqueraded)."""
    with _netlink("read the default route") as ipr:
        for route in ipr.get_default_routes(family=socket.AF_INET):
            oif = route.get_attr("RTA_OIF")
            if oif is not None:
                return str(_link(ipr, int(oif)).get_attr("IFLA_IFNAME"))
    return None


# routes to the private addresses other hosts of a fleet hold
RTPROT_HANGAR = 152
"""The routing protocol number hangar's peer routes carry, so they are found and replaced
without touching any other route of the host."""


@dataclass(frozen=True, order=True)
class PeerRoute:
    """``prefix`` (an org's /64 on another host) is reached through ``via``, that host's
    underlay address."""

    prefix: IPv6Network
    via: IPv6Address


def peer_routes() -> set[PeerRoute]:
    """The peer routes installed now (those of hangar's protocol)."""
    found: set[PeerRoute] = set()
    with _netlink("list peer routes") as ipr:
        for message in ipr.get_routes(family=socket.AF_INET6, proto=RTPROT_HANGAR):
            dst, gateway = message.get_attr("RTA_DST"), message.get_attr("RTA_GATEWAY")
            if message["proto"] != RTPROT_HANGAR or dst is None or gateway is None:
                continue
            found.add(PeerRoute(IPv6Network(f"{dst}/{message['dst_len']}"), IPv6Address(gateway)))
    return found


def sync_peer_routes(desired: Set[PeerRoute]) -> None:
    """Make the peer routes exactly ``desired``: add or repoint what is missing, delete the
    rest (safe to repeat)."""
    current = peer_routes()
    with _netlink("set peer routes") as ipr:
        for route in sorted(desired - current):
            ipr.route(
                "replace",
                dst=str(route.prefix),
                gateway=str(route.via),
                family=socket.AF_INET6,
                proto=RTPROT_HANGAR,
            )
        wanted = {route.prefix for route in desired}
        for route in sorted(current - desired):
            if route.prefix in wanted:
                continue  # repointed by the replace above
            with contextlib.suppress(NetlinkError):
                ipr.route(
                    "del",
                    dst=str(route.prefix),
                    gateway=str(route.via),
                    family=socket.AF_INET6,
                    proto=RTPROT_HANGAR,
                )


def interface_holding(address: IPv6Address) -> str | None:
    """The name of the interface that has ``address`` (None: no interface of this host)."""
    with _netlink("find an address's interface") as ipr:
        for message in ipr.get_addr(family=socket.AF_INET6):
            if IPv6Address(message.get_attr("IFA_ADDRESS")) == address:
                return str(_link(ipr, int(message["index"])).get_attr("IFLA_IFNAME"))
    return None
