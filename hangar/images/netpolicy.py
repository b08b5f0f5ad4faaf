"""Where the host may connect to pull an image: never to itself.

A tenant names the registry (``config.image``), so a pull is the host making a connection of
the tenant's choosing. Addresses on loopback, link-local (cloud metadata services live
there), unspecified, multicast or reserved ranges, and the host's own addresses are refused,
unless the operator lists the registry (``HANGAR_LOCAL_REGISTRIES``). The check is made on
the addresses the name resolves to, and the connection then goes to the address checked (a
name cannot resolve to something else between the check and the connect).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hangar.errors import ImageError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
OWN_ADDRESSES_TTL_S = 30.0
OWN_ADDRESSES_READ_S = 10.0


def split_host_port(authority: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` or ``[v6][:port]`` -> (host without brackets, port)."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, _, port = authority.partition(":")
    else:
        host, port = authority, ""
    return host.lower(), int(port) if port else default_port


def read_own_addresses() -> set[Address]:
    """Every address configured on this host's interfaces (netlink, read on a thread of its
    own: pyroute2 runs an event loop, and pulls call this from inside one)."""
    from pyroute2 import IPRoute

    found: set[Address] = set()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            with IPRoute() as ipr:
                for message in ipr.get_addr():
                    value = message.get_attr("IFA_ADDRESS") or message.get_attr("IFA_LOCAL")
                    if value:
                        found.add(ipaddress.ip_address(value.split("%")[0]))
        except BaseException as error:  # handed to the caller's thread
            errors.append(error)

    reader = threading.Thread(target=read, name="own-addresses", daemon=True)
    reader.start()
    reader.join(OWN_ADDRESSES_READ_S)
    if errors:
        raise OSError(f"cannot read this host's addresses: {errors[0]}")
    return found


def _plain(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def refused_kind(address: Address, own: Iterable[Address]) -> str | None:
    """Why the host must not connect to ``address`` (None: it may)."""
    plain = _plain(address)
    if plain.is_loopback:
        return "loopback"
    if plain.is_link_local:
        return "link-local"
    if plain.is_unspecified or plain.is_multicast or plain.is_reserved:
        return "not a unicast address"
    if plain in {_plain(mine) for mine in own}:
        return "this host's own address"
    return None


Resolver = Callable[[str, int], list[Address]]


def resolve(host: str, port: int) -> list[Address]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


@dataclass
class RegistryPolicy:
    """Which registries the host pulls from, and how.

    ``local``: ``host:port`` registries the operator allows on any address (a registry on
    this host); ``insecure``: ``host:port`` registries spoken to over plain HTTP; ``tls``:
    the certificates to trust (default: the system's)."""

    local: frozenset[str] = frozenset()
    insecure: frozenset[str] = frozenset()
    tls: ssl.SSLContext | None = None
    resolver: Resolver = resolve
    own_addresses: Callable[[], set[Address]] = read_own_addresses
    _own: tuple[float, set[Address]] | None = field(default=None, repr=False)

    def is_insecure(self, authority: str) -> bool:
        return authority.lower() in {name.lower() for name in self.insecure}

    def _own_now(self) -> set[Address]:
        now = time.monotonic()
        if self._own is None or now - self._own[0] > OWN_ADDRESSES_TTL_S:
            try:
                self._own = (now, self.own_addresses())
            except OSError:
                self._own = (now, set())
        return self._own[1]

    def addresses(self, authority: str, default_port: int) -> list[Address]:
        """The addresses to connect to for ``authority``; ``ImageError`` (a fixed reason,
        nothing of what answered) if it does not resolve or any of them is refused."""
        host, port = split_host_port(authority, default_port)
        try:
            found = self.resolver(host, port)
        except (OSError, UnicodeError, ValueError):
            raise unreachable(authority) from None
        if not found:
            raise unreachable(authority)
        if authority.lower() in {name.lower() for name in self.local}:
            return found
        own = self._own_now()
        for address in found:
            kind = refused_kind(address, own)
            if kind is not None:
                raise ImageError(
                    f"registry {authority} is refused: hangar does not pull from {kind} "
                    "addresses (an operator may allow a registry with HANGAR_LOCAL_REGISTRIES)",
                    registry=authority,
                    reason="address_refused",
                )
        return found


def unreachable(authority: str) -> ImageError:
    """The one answer for a registry that could not be spoken to, whatever was there: a closed
    port, something that is not a registry, a TLS failure, a timeout."""
    return ImageError(
        f"registry {authority} is unreachable",
        registry=authority,
        reason="unreachable",
        retryable=True,
    )
