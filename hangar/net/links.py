"""Host links through netlink (pyroute2): the bridge and one tap per machine, each operation
idempotent and paired with a check, so agent steps can ask "should I run?" and then run.

Names: every link hangar makes starts with a prefix (``hg`` by default; tests use a random one)
and has at most 15 characters: the bridge is ``PREFIXbr``, a machine's tap ``PREFIXt`` followed
by hex digits of a hash of its id. A tap's alias holds its :class:`Attachment`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import re
import socket
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Address, IPv6Interface, IPv6Network, ip_interface
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hangar.errors import NetworkError
from hangar.net.attachment import Attachment

IFNAMSIZ = 15
DEFAULT_PREFIX = "hg"
PREFIX_PATTERN = re.compile(r"^hg[a-z0-9]{0,6}$")
IFA_F_NODAD = 0x02
SYSCTL_ROOT = Path("/proc/sys/net")
BRIDGE_ROUTE_METRIC = 256


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

    def tap(self, machine_id: str) -> str:
        digits = IFNAMSIZ - len(self.tap_head)
        return self.tap_head + hashlib.sha256(machine_id.encode()).hexdigest()[:digits]

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
class TapState:
    name: str
    attachment: Attachment | None
    """None: the tap carries no whole alias (a crash between creating and labelling it)."""
    master: str | None
    up: bool


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
        present = _addresses(ipr, index)
        for address in config.addresses:
            if address not in present:
                ipr.addr(
                    "add",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                    flags=IFA_F_NODAD,
                )
        for route in config.routes:
            ipr.route(
                "replace",
                dst=str(route),
                oif=index,
                family=socket.AF_INET6,
                priority=BRIDGE_ROUTE_METRIC,
            )


def _remove_link(name: str, kind: str, what: str) -> bool:
    with _netlink(f"remove {what}", link=name) as ipr:
        index = _index(ipr, name)
        if index is None:
            return False
        if _kind(_link(ipr, index)) != kind:
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
    return _remove_link(name, "bridge", "a bridge")


def _tap_state(ipr: IPRoute, link: Any, names: dict[int, str]) -> TapState:
    master = link.get_attr("IFLA_MASTER")
    return TapState(
        name=link.get_attr("IFLA_IFNAME"),
        attachment=Attachment.from_alias(link.get_attr("IFLA_IFALIAS")),
        master=names.get(int(master)) if master is not None else None,
        up=_is_up(link),
    )


def list_taps(names: LinkNames) -> list[TapState]:
    """The taps on this host that carry hangar's names (whatever their alias says)."""
    with _netlink("list taps") as ipr:
        by_index = _names_by_index(ipr)
        return [
            _tap_state(ipr, link, by_index)
            for link in ipr.get_links()
            if names.is_tap(link.get_attr("IFLA_IFNAME")) and _kind(link) == "tun"
        ]


def tap_state(name: str) -> TapState | None:
    with _netlink("read a tap", tap=name) as ipr:
        index = _index(ipr, name)
        if index is None:
            return None
        return _tap_state(ipr, _link(ipr, index), _names_by_index(ipr))


def tap_ready(attachment: Attachment, bridge: str) -> bool:
    """Is the machine's tap there, labelled with ``attachment``, on ``bridge`` and up?"""
    state = tap_state(attachment.tap)
    return (
        state is not None and state.attachment == attachment and state.master == bridge and state.up
    )


def create_tap(attachment: Attachment, bridge: str) -> None:
    """Create the machine's tap (persistent, for QEMU to open by name), label it with the
    attachment, put it on ``bridge`` and up. A tap of that name left half-made is replaced;
    one that holds another machine's attachment is an error."""
    name = attachment.tap
    with _netlink("create a tap", tap=name, machine_id=attachment.machine_id) as ipr:
        bridge_index = _index(ipr, bridge)
        if bridge_index is None:
            raise NetworkError(
                f"bridge {bridge} does not exist", retryable=True, bridge=bridge, tap=name
            )
        index = _index(ipr, name)
        if index is not None:
            link = _link(ipr, index)
            held = Attachment.from_alias(link.get_attr("IFLA_IFALIAS"))
            if _kind(link) != "tun" or (
                held is not None and held.machine_id != attachment.machine_id
            ):
                raise NetworkError(
                    f"{name} is already another link"
                    + (f" (machine {held.machine_id})" if held is not None else ""),
                    retryable=False,
                    tap=name,
                    machine_id=attachment.machine_id,
                )
            if held != attachment:
                ipr.link("del", index=index)
                index = None
        if index is None:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            index = _index(ipr, name)
            assert index is not None
        # The host side of a tap carries no address of its own.
        write_sysctl(f"ipv6/conf/{name}/disable_ipv6", "1")
        ipr.link("set", index=index, ifalias=attachment.alias())
        ipr.link("set", index=index, master=bridge_index, state="up")


def remove_tap(name: str) -> bool:
    """Delete a tap; False if it was not there. A running QEMU loses its network."""
    return _remove_link(name, "tun", "a tap")


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
