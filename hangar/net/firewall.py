"""hangar's nftables ruleset: rendered whole from the machines on the host and the host's
policy, and replaced atomically (``nft -f``: one transaction).

Two tables of one name, because frames between taps are switched by the bridge: only the
bridge family sees them on every host (the IP hooks see them only where br_netfilter is loaded):

- ``bridge NAME``: frames from the taps. *ports_in* (bridge prerouting) drops any frame whose
  source MAC, IPv6, IPv4 or ARP sender is not the tap's own, any ethertype but IPv4, IPv6 and
  ARP, and everything from a tap of hangar's name that the ruleset does not list yet.
  *between_ports* (bridge forward) lets a frame from a tap reach only taps of the same org,
  and only IPv6 (IPv4 is for egress alone).
- ``inet NAME``: packets from the bridge to the host (*guest_to_host*, IP input): only ICMP
  that networking needs, the DNS service on its address and port, the proxy's published ports,
  and replies; everything else bound on the host (the API, anything on 0.0.0.0) is dropped.
  *routed* (IP forward): the bridge's traffic leaves only to the egress interface, from the
  egress subnet, and nothing enters the bridge but replies; a packet routed back into the
  bridge passes only within one org's prefix. Where ``br_netfilter`` is loaded, frames the
  bridge forwards show up here too (in and out on the bridge): the same test lets the
  same-org ones through, with link-local and multicast, which are never routed.
  *egress_nat* masquerades egress behind the egress interface's address.

Drops are counted in named counters (:data:`COUNTERS`), read by :func:`read_counters`.
The inet table's comment holds a digest of the whole text, so :func:`ruleset_current` tells
whether a rendered ruleset is the one loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Address, IPv6Network

from hangar.errors import NetworkError
from hangar.net.attachment import Attachment
from hangar.vmm.driver import IFNAME_PATTERN

NFT_BINARY = "nft"
NFT_TIMEOUT_S = 30.0
TABLE_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
TAP_HEAD_PATTERN = re.compile(r"^hg[a-z0-9]{0,12}$")
COUNTERS = ("spoofed", "cross_org", "host_blocked", "routed_blocked")
DIGEST_MARK = "hangar sha256:"
# Egress never goes to link-local (metadata services), loopback or multicast destinations.
EGRESS_DENIED = ("169.254.0.0/16", "127.0.0.0/8", "224.0.0.0/4", "255.255.255.255")
ICMPV6_TO_HOST = (
    "destination-unreachable",
    "packet-too-big",
    "time-exceeded",
    "parameter-problem",
    "echo-request",
    "nd-router-solicit",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
)
ICMP_TO_HOST = ("echo-request", "destination-unreachable", "time-exceeded")


@dataclass(frozen=True)
class FirewallPolicy:
    """The host's side of the ruleset."""

    table: str
    bridge: str
    tap_head: str
    """What the names of hangar's taps start with: a tap of that name that the ruleset does
    not list (made, not yet in the rules) passes nothing."""
    dns_address: IPv6Address
    org_prefixes: dict[int, IPv6Network]
    """Each org number's /48 (for the orgs with machines here, at least)."""
    dns_port: int = 53
    egress_interface: str | None = None
    """Where egress is masqueraded; None turns egress off."""
    egress_subnet: IPv4Network | None = None
    published_tcp: frozenset[int] = field(default_factory=frozenset)
    published_udp: frozenset[int] = field(default_factory=frozenset)
    underlay_interface: str | None = None
    """Where the fleet's other hosts are (None: the private network stays on this host)."""
    peers: frozenset[IPv6Address] = field(default_factory=frozenset)
    """The other hosts' underlay addresses: their proxies and checks reach guests here."""

    def __post_init__(self) -> None:
        if not TABLE_PATTERN.fullmatch(self.table):
            raise _bad(f"table name {self.table!r} must match {TABLE_PATTERN.pattern}", "table")
        if not TAP_HEAD_PATTERN.fullmatch(self.tap_head):
            raise _bad(
                f"tap head {self.tap_head!r} must match {TAP_HEAD_PATTERN.pattern}", "tap_head"
            )
        for what, name in (
            ("bridge", self.bridge),
            ("egress_interface", self.egress_interface),
            ("underlay_interface", self.underlay_interface),
        ):
            if name is not None and not IFNAME_PATTERN.fullmatch(name):
                raise _bad(f"{what} {name!r} is not an interface name", what)
        if self.egress_interface is not None and self.egress_subnet is None:
            raise _bad("egress needs an egress subnet", "egress_subnet")
        ports = [self.dns_port, *self.published_tcp, *self.published_udp]
        if any(not 0 < port < 65536 for port in ports):
            raise _bad(f"ports must be 1..65535: {sorted(ports)}", "ports")


def _bad(message: str, setting: str) -> NetworkError:
    return NetworkError(message, retryable=False, setting=setting)


def _quoted(name: str) -> str:
    return f'"{name}"'


def _elements(items: Iterable[str]) -> str:
    listed = sorted(set(items))
    return f"elements = {{ {', '.join(listed)} }}" if listed else ""


def _set(name: str, kind: str, items: Iterable[str]) -> list[str]:
    elements = _elements(items)
    return [
        f"\tset {name} {{",
        f"\t\ttype {kind}",
        *([f"\t\t{elements}"] if elements else []),
        "\t}",
    ]


def check_attachments(attachments: Sequence[Attachment]) -> None:
    """Raise :class:`NetworkError` if two machines share a tap, MAC or address."""
    for what in ("tap", "mac", "ip6", "ip4", "machine_id"):
        seen: dict[object, str] = {}
        for attachment in attachments:
            value = getattr(attachment, what)
            if value is None:
                continue
            if value in seen:
                raise NetworkError(
                    f"machines {seen[value]} and {attachment.machine_id} share {what} {value}",
                    retryable=False,
                    field=what,
                    machine_ids=[seen[value], attachment.machine_id],
                )
            seen[value] = attachment.machine_id


def _org_chain(org: int) -> str:
    return f"org_{org}"


def _bridge_table(policy: FirewallPolicy, attachments: Sequence[Attachment]) -> list[str]:
    orgs = sorted({a.org_number for a in attachments})
    lines = [f"table bridge {policy.table} {{"]
    lines += _set("taps", "ifname", (_quoted(a.tap) for a in attachments))
    lines += _set(
        "tap_mac", "ifname . ether_addr", (f"{_quoted(a.tap)} . {a.mac}" for a in attachments)
    )
    lines += _set(
        "tap_ip6",
        "ifname . ipv6_addr",
        [f"{_quoted(a.tap)} . {a.ip6}" for a in attachments]
        + [f"{_quoted(a.tap)} . {a.link_local}" for a in attachments],
    )
    lines += _set(
        "tap_ip4",
        "ifname . ipv4_addr",
        (f"{_quoted(a.tap)} . {a.ip4}" for a in attachments if a.ip4 is not None),
    )
    for org in orgs:
        members = (_quoted(a.tap) for a in attachments if a.org_number == org)
        lines += _set(f"{_org_chain(org)}_taps", "ifname", members)
    port_org = (f"{_quoted(a.tap)} : jump {_org_chain(a.org_number)}" for a in attachments)
    lines += ["\tmap port_org {", "\t\ttype ifname : verdict"]
    elements = _elements(port_org)
    lines += [f"\t\t{elements}"] if elements else []
    lines += ["\t}"]
    lines += [f"\tcounter {name} {{ }}" for name in ("spoofed", "cross_org")]
    lines += [
        "\tchain ports_in {",
        "\t\ttype filter hook prerouting priority filter; policy accept;",
        f'\t\tiifname != @taps iifname "{policy.tap_head}*" counter name "spoofed" drop',
        "\t\tiifname != @taps accept",
        '\t\tiifname . ether saddr != @tap_mac counter name "spoofed" drop',
        '\t\tether type ip6 iifname . ip6 saddr != @tap_ip6 counter name "spoofed" drop',
        '\t\tether type ip iifname . ip saddr != @tap_ip4 counter name "spoofed" drop',
        '\t\tether type arp iifname . arp saddr ip != @tap_ip4 counter name "spoofed" drop',
        '\t\tether type arp iifname . arp saddr ether != @tap_mac counter name "spoofed" drop',
        "\t\tether type { ip, ip6, arp } accept",
        '\t\tcounter name "spoofed" drop',
        "\t}",
        "\tchain between_ports {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        "\t\tiifname vmap @port_org",
        '\t\toifname @taps counter name "cross_org" drop',
        f'\t\toifname "{policy.tap_head}*" counter name "cross_org" drop',
        "\t}",
    ]
    for org in orgs:
        lines += [
            f"\tchain {_org_chain(org)} {{",
            f"\t\tether type ip6 oifname @{_org_chain(org)}_taps accept",
            '\t\tcounter name "cross_org" drop',
            "\t}",
        ]
    lines.append("}")
    return lines


def _inet_table(
    policy: FirewallPolicy, attachments: Sequence[Attachment], digest: str
) -> list[str]:
    bridge = _quoted(policy.bridge)
    lines = [f"table inet {policy.table} {{", f'\tcomment "{DIGEST_MARK}{digest}"']
    lines += _set("published_tcp", "inet_service", (str(p) for p in policy.published_tcp))
    lines += _set("published_udp", "inet_service", (str(p) for p in policy.published_udp))
    lines += _set("peers", "ipv6_addr", (str(p) for p in policy.peers))
    lines += [f"\tcounter {name} {{ }}" for name in ("host_blocked", "routed_blocked")]
    dns = policy.dns_address
    lines += [
        "\tchain guest_to_host {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f"\t\tiifname != {bridge} accept",
        "\t\tct state established,related accept",
        '\t\tct state invalid counter name "host_blocked" drop',
        f"\t\ticmpv6 type {{ {', '.join(ICMPV6_TO_HOST)} }} accept",
        f"\t\ticmp type {{ {', '.join(ICMP_TO_HOST)} }} accept",
        f"\t\tip6 daddr {dns} udp dport {policy.dns_port} accept",
        f"\t\tip6 daddr {dns} tcp dport {policy.dns_port} accept",
        "\t\ttcp dport @published_tcp accept",
        "\t\tudp dport @published_udp accept",
        '\t\tcounter name "host_blocked" drop',
        "\t}",
        "\tchain routed {",
        "\t\ttype filter hook forward priority filter; policy accept;",
        f"\t\tiifname {bridge} oifname {bridge} jump same_org",
    ]
    if policy.underlay_interface is not None:
        # Other hosts of the fleet: guests reach their org's machines there and back, and the
        # other hosts themselves (their proxies, their checks) reach guests here.
        underlay = _quoted(policy.underlay_interface)
        lines += [
            f"\t\tiifname {bridge} oifname {underlay} ip6 daddr @peers "
            "ct state established,related accept",
            f"\t\tiifname {bridge} oifname {underlay} meta nfproto ipv6 jump same_org",
            f"\t\tiifname {underlay} oifname {bridge} ip6 saddr @peers accept",
            f"\t\tiifname {underlay} oifname {bridge} meta nfproto ipv6 jump same_org",
        ]
    lines += [
        f"\t\toifname {bridge} ct state established,related accept",
        f'\t\toifname {bridge} counter name "routed_blocked" drop',
    ]
    if policy.egress_interface is not None and policy.egress_subnet is not None:
        denied = ", ".join(EGRESS_DENIED)
        lines.append(
            f"\t\tiifname {bridge} oifname {_quoted(policy.egress_interface)} "
            f"ip saddr {policy.egress_subnet} ip daddr != {{ {denied} }} accept"
        )
    lines += [f'\t\tiifname {bridge} counter name "routed_blocked" drop', "\t}"]
    # Link-local and multicast are never routed: seen here, they were bridged (br_netfilter
    # shows bridged packets to the IP hooks too) and the bridge table has judged them already.
    lines += [
        "\tchain same_org {",
        "\t\tip6 saddr fe80::/10 accept",
        "\t\tip6 daddr ff00::/8 accept",
    ]
    for org in sorted({a.org_number for a in attachments}):
        prefix = policy.org_prefixes.get(org)
        if prefix is None:
            raise _bad(f"no prefix for org number {org}", "org_prefixes")
        lines.append(f"\t\tip6 saddr {prefix} ip6 daddr {prefix} accept")
    lines += ['\t\tcounter name "routed_blocked" drop', "\t}"]
    if policy.egress_interface is not None and policy.egress_subnet is not None:
        lines += [
            "\tchain egress_nat {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            f"\t\toifname {_quoted(policy.egress_interface)} ip saddr {policy.egress_subnet} "
            "masquerade",
            "\t}",
        ]
    lines.append("}")
    return lines


def _replace(family: str, table: str) -> list[str]:
    """Create-then-delete: the next definition starts from nothing, in the same transaction."""
    return [f"table {family} {table} {{ }}", f"delete table {family} {table}"]


def render_ruleset(policy: FirewallPolicy, attachments: Sequence[Attachment]) -> str:
    """The whole ruleset as ``nft -f`` input: replaces both tables in one transaction."""
    check_attachments(attachments)
    ordered = sorted(attachments, key=lambda a: a.tap)
    body = _bridge_table(policy, ordered)
    digest = hashlib.sha256("\n".join(body).encode())
    digest.update("\n".join(_inet_table(policy, ordered, "")).encode())
    lines = [
        *_replace("bridge", policy.table),
        *body,
        *_replace("inet", policy.table),
        *_inet_table(policy, ordered, digest.hexdigest()),
    ]
    return "\n".join(lines) + "\n"


def removal(table: str) -> str:
    """``nft -f`` input that deletes both tables (and succeeds if they are not there)."""
    return "\n".join([*_replace("bridge", table), *_replace("inet", table)]) + "\n"


def _nft(args: Sequence[str], stdin: str | None, action: str, **fields: object) -> str:
    try:
        done = subprocess.run(
            [NFT_BINARY, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"cannot {action}: {exc}", retryable=True, **fields) from exc
    if done.returncode != 0:
        raise NetworkError(
            f"cannot {action}: nft exited {done.returncode}: {done.stderr.strip()[-2000:]}",
            retryable=False,
            **fields,
        )
    return done.stdout


def apply_ruleset(ruleset: str) -> None:
    """Load a rendered ruleset: all of it or, if nft rejects any line, none of it."""
    _nft(["-f", "-"], ruleset, "load hangar's nftables ruleset")


def remove_ruleset(table: str) -> None:
    if not TABLE_PATTERN.fullmatch(table):
        raise _bad(f"table name {table!r} must match {TABLE_PATTERN.pattern}", "table")
    _nft(["-f", "-"], removal(table), "remove hangar's nftables ruleset", table=table)


def loaded_digest(table: str) -> str | None:
    """The digest in the loaded inet table's comment (None: no such table of hangar's)."""
    try:
        text = _nft(["list", "table", "inet", table], None, "read hangar's table", table=table)
    except NetworkError:
        return None
    found = re.search(rf'comment "{re.escape(DIGEST_MARK)}([0-9a-f]+)"', text)
    return found.group(1) if found else None


def ruleset_digest(ruleset: str) -> str | None:
    found = re.search(rf'comment "{re.escape(DIGEST_MARK)}([0-9a-f]+)"', ruleset)
    return found.group(1) if found else None


def ruleset_current(table: str, ruleset: str) -> bool:
    """Is ``ruleset`` (rendered) the one loaded, both tables of it?"""
    if loaded_digest(table) != ruleset_digest(ruleset):
        return False
    return table_exists("bridge", table)


def table_exists(family: str, table: str) -> bool:
    try:
        _nft(["list", "table", family, table], None, "read a table", table=table)
    except NetworkError:
        return False
    return True


def read_counters(table: str) -> dict[str, int]:
    """Packets counted by each named counter of both tables (``COUNTERS``)."""
    found: dict[str, int] = {}
    for family in ("bridge", "inet"):
        if not table_exists(family, table):
            continue
        text = _nft(["-j", "list", "counters", "table", family, table], None, "read counters")
        for item in json.loads(text).get("nftables", []):
            counter = item.get("counter")
            if counter is not None and counter.get("table") == table:
                found[counter["name"]] = int(counter["packets"])
    return found
