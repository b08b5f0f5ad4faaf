"""The private network's address plan: every org's IPv6 prefix, every machine's address and MAC,
the host-side service addresses. Pure and deterministic: the same inputs give the same plan on
every host, so nothing here needs a record except the org and host numbers (see below).

Layout of a private address (the operator's ULA prefix is ``/P``, 8 <= P <= 32, default
``fdaa::/16``)::

    | ULA prefix (P) | org number (48-P) | host number (16) | interface id (64) |
    |<-------- org prefix /48 -------->|
    |<------------ org-on-host prefix /64 -------------->|

- an org's machines are all in its ``/48`` (isolation is a test on those bits, on any host);
- each host holds one ``/64`` of each org it runs machines of, so a fleet can route per-host
  prefixes (or bridge an org's ``/48`` over one VXLAN VNI per org) without renumbering;
- the interface id is a hash of the machine id: stable across stop and start on a host;
- org number 0 is the infrastructure's: ``PREFIX::3`` is the DNS service on every host
  (``fdaa::3`` with the default prefix, as on Fly).

Org numbers and host numbers are derived from the org slug and the host id by a hash, probed
past collisions (:func:`allocate_number`); a store that records the number it got keeps it
stable even if a colliding org is created later. The gateway is the bridge's link-local
``fe80::1``. IPv4 exists only for egress: each machine gets an address in the host's egress
subnet (default ``172.19.0.0/16``, the same on every host, never routed between hosts).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hangar.errors import NetworkError

DEFAULT_ULA_PREFIX = IPv6Network("fdaa::/16")
DEFAULT_EGRESS_SUBNET = IPv4Network("172.19.0.0/16")
ULA_RANGE = IPv6Network("fd00::/8")
ORG_PREFIX_LEN = 48
HOST_PREFIX_LEN = 64
HOST_NUMBER_BITS = HOST_PREFIX_LEN - ORG_PREFIX_LEN
MIN_ULA_PREFIX_LEN = 8
MAX_ULA_PREFIX_LEN = 32
INFRA_ORG = 0
DNS_INTERFACE_ID = 3
GATEWAY_LINK_LOCAL = IPv6Address("fe80::1")
LINK_LOCAL_PREFIX_LEN = 64
# Interface ids below this are kept for infrastructure inside an org-on-host /64.
RESERVED_INTERFACE_IDS = 1 << 16
MAX_PROBES = 64
# Locally administered, unicast: machines' MACs start with 06, bridges' with 0a.
MACHINE_MAC_OCTET = 0x06
BRIDGE_MAC_OCTET = 0x0A
MIN_EGRESS_PREFIX_LEN = 8
MAX_EGRESS_PREFIX_LEN = 28


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def _hash_number(bits: int, *parts: str) -> int:
    return int.from_bytes(_digest(*parts)[:8], "big") % (1 << bits)


def allocate_number(
    kind: str, key: str, bits: int, taken: Mapping[int, str], *, reserved: Collection[int] = ()
) -> int:
    """The number ``key`` gets among ``2**bits``: its hash, or the next probe of it while
    another key holds that number (``taken``: number -> key) or it is ``reserved``.

    Deterministic for a given ``taken``; raises :class:`NetworkError` after ``MAX_PROBES``.
    """
    for attempt in range(MAX_PROBES):
        number = _hash_number(bits, kind, key, str(attempt))
        if number in reserved:
            continue
        holder = taken.get(number)
        if holder is None or holder == key:
            return number
    raise NetworkError(
        f"no free {kind} number for {key!r} after {MAX_PROBES} probes ({bits} bits, "
        f"{len(taken)} taken)",
        retryable=False,
        kind=kind,
        key=key,
    )


def mac_text(raw: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in raw)


def machine_mac(machine_id: str) -> str:
    """The machine's MAC: locally administered unicast, from a hash of its id."""
    return mac_text(bytes([MACHINE_MAC_OCTET]) + _digest("mac", machine_id)[:5])


def bridge_mac(host_number: int) -> str:
    """A fixed MAC for the host's bridge, so it never changes as taps come and go."""
    return mac_text(bytes([BRIDGE_MAC_OCTET, 0, 0, 0]) + host_number.to_bytes(2, "big"))


def link_local_of(mac: str) -> IPv6Address:
    """The EUI-64 link-local address a Linux guest derives from ``mac``."""
    raw = bytes(int(part, 16) for part in mac.split(":"))
    eui = bytes([raw[0] ^ 0x02, raw[1], raw[2], 0xFF, 0xFE, raw[3], raw[4], raw[5]])
    return IPv6Address(b"\xfe\x80" + b"\0" * 6 + eui)


@dataclass(frozen=True)
class AddressPlan:
    """The operator's choices: the ULA prefix and the egress subnet."""

    ula_prefix: IPv6Network = DEFAULT_ULA_PREFIX
    egress_subnet: IPv4Network = DEFAULT_EGRESS_SUBNET

    def __post_init__(self) -> None:
        prefix = self.ula_prefix
        if not prefix.subnet_of(ULA_RANGE) or not (
            MIN_ULA_PREFIX_LEN <= prefix.prefixlen <= MAX_ULA_PREFIX_LEN
        ):
            raise NetworkError(
                f"the private network prefix {prefix} must be inside {ULA_RANGE}, "
                f"/{MIN_ULA_PREFIX_LEN} to /{MAX_ULA_PREFIX_LEN}",
                retryable=False,
                setting="ula_prefix",
            )
        subnet = self.egress_subnet
        if not subnet.is_private or not (
            MIN_EGRESS_PREFIX_LEN <= subnet.prefixlen <= MAX_EGRESS_PREFIX_LEN
        ):
            raise NetworkError(
                f"the egress subnet {subnet} must be a private IPv4 range, "
                f"/{MIN_EGRESS_PREFIX_LEN} to /{MAX_EGRESS_PREFIX_LEN}",
                retryable=False,
                setting="egress_subnet",
            )

    @classmethod
    def parse(cls, ula_prefix: str, egress_subnet: str) -> AddressPlan:
        try:
            return cls(IPv6Network(ula_prefix), IPv4Network(egress_subnet))
        except ValueError as exc:
            raise NetworkError(
                f"bad private network setting: {exc}", retryable=False, setting="network"
            ) from exc

    # orgs and hosts
    @property
    def org_bits(self) -> int:
        return ORG_PREFIX_LEN - self.ula_prefix.prefixlen

    def org_number(self, org: str, taken: Mapping[int, str] | None = None) -> int:
        """``org``'s number (never 0), probed past the numbers in ``taken``."""
        return allocate_number("org", org, self.org_bits, taken or {}, reserved=(INFRA_ORG,))

    def check_org_number(self, number: int) -> None:
        if not 0 < number < 1 << self.org_bits:
            raise NetworkError(
                f"org number {number} is outside 1..{(1 << self.org_bits) - 1}",
                retryable=False,
                org_number=number,
            )

    def org_prefix(self, org_number: int) -> IPv6Network:
        self.check_org_number(org_number)
        base = int(self.ula_prefix.network_address) | org_number << (128 - ORG_PREFIX_LEN)
        return IPv6Network((base, ORG_PREFIX_LEN))

    def org_host_prefix(self, org_number: int, host_number: int) -> IPv6Network:
        check_host_number(host_number)
        base = int(self.org_prefix(org_number).network_address)
        return IPv6Network((base | host_number << (128 - HOST_PREFIX_LEN), HOST_PREFIX_LEN))

    # addresses
    def machine_address(self, org_number: int, host_number: int, machine_id: str) -> IPv6Address:
        """The machine's ``private_ip``: org, host and a hash of the machine id."""
        interface_id = _hash_number(128 - HOST_PREFIX_LEN, "machine", machine_id)
        if interface_id < RESERVED_INTERFACE_IDS:
            interface_id |= 1 << 63
        base = int(self.org_host_prefix(org_number, host_number).network_address)
        return IPv6Address(base | interface_id)

    def org_of(self, address: IPv6Address) -> int | None:
        """The org number a private address belongs to (None: not a machine's address)."""
        if address not in self.ula_prefix:
            return None
        number = (int(address) >> (128 - ORG_PREFIX_LEN)) & ((1 << self.org_bits) - 1)
        return None if number == INFRA_ORG else number

    @property
    def dns_address(self) -> IPv6Address:
        return IPv6Address(int(self.ula_prefix.network_address) | DNS_INTERFACE_ID)

    @property
    def egress_gateway(self) -> IPv4Address:
        return self.egress_subnet.network_address + 1

    def egress_address(self, machine_id: str, taken: Collection[IPv4Address]) -> IPv4Address:
        """An egress address for the machine on this host: a hash of its id into the subnet,
        probed past ``taken`` (the addresses of the host's other machines)."""
        first = int(self.egress_gateway) + 1
        count = self.egress_subnet.num_addresses - 3  # network, gateway, broadcast
        start = _hash_number(32, "egress", machine_id) % count
        taken_set = set(taken)
        for step in range(count):
            candidate = IPv4Address(first + (start + step) % count)
            if candidate not in taken_set:
                return candidate
        raise NetworkError(
            f"the egress subnet {self.egress_subnet} is full ({len(taken_set)} machines)",
            retryable=True,
            machine_id=machine_id,
        )


def check_host_number(number: int) -> None:
    if not 0 <= number < 1 << HOST_NUMBER_BITS:
        raise NetworkError(
            f"host number {number} is outside 0..{(1 << HOST_NUMBER_BITS) - 1}",
            retryable=False,
            host_number=number,
        )


def host_number(host_id: str, taken: Mapping[int, str] | None = None) -> int:
    """``host_id``'s number in the fleet, probed past the numbers other hosts hold."""
    return allocate_number("host", host_id, HOST_NUMBER_BITS, taken or {})
