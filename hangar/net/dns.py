"""The internal DNS service: one per host, on the private network's DNS address (``fdaa::3`` by
default), answering each machine about its own org only (dnspython for the wire format).

Names, all under ``internal.``, for the asking machine's org:

- ``<app>.internal`` AAAA: the app's started machines;
- ``<machine_id>.vm.<app>.internal`` AAAA: that machine, when started;
- ``<region>.<app>.internal`` AAAA: the app's started machines in that region;
- ``top<N>.nearest.of.<app>.internal`` AAAA: the N started machines nearest the asker (same host,
  then same region, then the rest);
- ``_apps.internal`` TXT: the org's app names, comma-separated.

Another org's names get NXDOMAIN, exactly as names that do not exist; a name that exists but has
no record of the asked type gets an empty answer; names outside ``internal.`` and askers that
are not machines get REFUSED. The asker is known by its source address, which the host's
firewall guarantees (no machine can send from an address that is not its own).

Bounds: each source gets a token bucket, and all sources together another (queries beyond
them are dropped, or the TCP connection closed); answers hold at most ``max_answers`` records
and fit the client's UDP size (512 bytes, or its EDNS size up to 1232), else come truncated
(TC) so the client retries over TCP; TCP serves at most ``max_tcp_connections`` at once, each
closed after ``tcp_idle_s`` idle or ``max_tcp_queries`` queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Protocol, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from hangar.clock import Clock, SystemClock
from hangar.errors import RateLimited
from hangar.model.machine import Machine, MachineState
from hangar.ratelimit import RateLimit, RateLimiter, RateLimits

log = logging.getLogger(__name__)

ZONE = dns.name.from_text("internal.")
TTL_S = 5
NEGATIVE_TTL_S = 5
SOA_TEXT = f"ns.internal. hostmaster.internal. 1 3600 600 86400 {NEGATIVE_TTL_S}"
UDP_MIN_SIZE = 512
UDP_MAX_SIZE = 1232
TCP_MAX_SIZE = 65535
TXT_CHUNK = 255
TOP_PATTERN = re.compile(r"^top([1-9][0-9]{0,2})$")

Address = IPv4Address | IPv6Address


@dataclass(frozen=True)
class DnsMachine:
    """A machine as DNS sees it."""

    id: str
    app: str
    org: str
    region: str
    host: str
    address: IPv6Address
    started: bool


class DnsView(Protocol):
    """What the DNS service knows, always asked with the asker's org."""

    def asker(self, source: Address) -> DnsMachine | None:
        """The machine that owns ``source`` (None: not a machine, refused)."""
        ...

    def apps(self, org: str) -> Sequence[str]: ...

    def machines(self, org: str, app: str) -> Sequence[DnsMachine]: ...


class SnapshotView:
    """A :class:`DnsView` over a snapshot of records; the owner swaps in a new one when much
    changes (:meth:`DnsServer.set_view`), or puts one machine's change (:meth:`put`)."""

    def __init__(self, apps: Mapping[str, Iterable[str]], machines: Iterable[DnsMachine]) -> None:
        self._apps = {org: sorted(set(names)) for org, names in apps.items()}
        self._by_id: dict[str, DnsMachine] = {}
        self._by_address: dict[Address, DnsMachine] = {}
        self._by_app: dict[tuple[str, str], dict[str, DnsMachine]] = {}
        for machine in machines:
            self._place(machine.id, machine)

    def put(self, machine_id: str, machine: DnsMachine | None) -> None:
        """Machine ``machine_id`` is now ``machine`` (None: it is gone); its app joins its
        org's apps."""
        self._place(machine_id, machine)
        if machine is not None:
            names = self._apps.setdefault(machine.org, [])
            if machine.app not in names:
                names.append(machine.app)
                names.sort()

    def _place(self, machine_id: str, machine: DnsMachine | None) -> None:
        old = self._by_id.pop(machine_id, None)
        if old is not None:
            if self._by_address.get(old.address) is old:
                del self._by_address[old.address]
            self._by_app.get((old.org, old.app), {}).pop(machine_id, None)
        if machine is None:
            return
        self._by_id[machine_id] = machine
        self._by_address[machine.address] = machine
        self._by_app.setdefault((machine.org, machine.app), {})[machine_id] = machine

    def asker(self, source: Address) -> DnsMachine | None:
        return self._by_address.get(source)

    def apps(self, org: str) -> Sequence[str]:
        return self._apps.get(org, [])

    def machines(self, org: str, app: str) -> Sequence[DnsMachine]:
        return list(self._by_app.get((org, app), {}).values())


def dns_record(machine: Machine, org: str | None) -> DnsMachine | None:
    """What DNS knows of ``machine`` of ``org``'s app (None: nothing, without an org or a
    ``private_ip``, or destroyed); it answers for its app while it is started."""
    if org is None or not machine.private_ip or machine.state is MachineState.DESTROYED:
        return None
    return DnsMachine(
        id=machine.id,
        app=machine.app,
        org=org,
        region=machine.region,
        host=machine.host_id,
        address=IPv6Address(machine.private_ip),
        started=machine.state == MachineState.STARTED,
    )


def view_from_records(app_orgs: Mapping[str, str], machines: Iterable[Machine]) -> SnapshotView:
    """A view over the store's records: ``app_orgs`` maps every app to its org."""
    apps: dict[str, list[str]] = {}
    for app, org in app_orgs.items():
        apps.setdefault(org, []).append(app)
    known = (dns_record(machine, app_orgs.get(machine.app)) for machine in machines)
    return SnapshotView(apps, [record for record in known if record is not None])


@dataclass(frozen=True)
class DnsLimits:
    queries_per_second: float = 50.0
    burst: int = 100
    """Per source address."""
    total_queries_per_second: float = 2000.0
    total_burst: int = 4000
    """All sources together: what the host spends on DNS at most."""
    max_answers: int = 64
    max_tcp_connections: int = 64
    max_tcp_queries: int = 64
    tcp_idle_s: float = 10.0


@dataclass
class _Outcome:
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR
    answers: list[dns.rrset.RRset] = field(default_factory=list)


@functools.lru_cache(maxsize=1 << 16)
def _aaaa(address: IPv6Address) -> dns.rdata.Rdata:
    """An address's record data, made once (parsing it is most of the cost of an answer)."""
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.AAAA, str(address))


def _nearest(asker: DnsMachine, machines: Iterable[DnsMachine]) -> list[DnsMachine]:
    def distance(machine: DnsMachine) -> tuple[int, str]:
        if machine.host == asker.host:
            return 0, machine.id
        return (1 if machine.region == asker.region else 2), machine.id

    return sorted(machines, key=distance)


class Resolver:
    """Answers one query from one source: pure, over a :class:`DnsView`."""

    def __init__(self, view: DnsView, max_answers: int = DnsLimits.max_answers) -> None:
        self.view = view
        self.max_answers = max_answers

    def resolve(self, query: dns.message.Message, source: Address) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        name = question.name
        if question.rdclass != dns.rdataclass.IN or not name.is_subdomain(ZONE):
            response.set_rcode(dns.rcode.REFUSED)
            return response
        asker = self.view.asker(source)
        if asker is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        labels = [label.decode().lower() for label in name.relativize(ZONE).labels]
        outcome = self._lookup(asker, labels, name, question.rdtype)
        response.set_rcode(outcome.rcode)
        response.answer.extend(outcome.answers)
        if not outcome.answers:
            response.authority.append(
                dns.rrset.from_text(ZONE, NEGATIVE_TTL_S, "IN", "SOA", SOA_TEXT)
            )
        return response

    def _lookup(
        self, asker: DnsMachine, labels: list[str], name: dns.name.Name, rdtype: int
    ) -> _Outcome:
        org = asker.org
        if labels == ["_apps"]:
            if rdtype not in (dns.rdatatype.TXT, dns.rdatatype.ANY):
                return _Outcome()
            return _Outcome(answers=[self._apps_txt(name, self.view.apps(org))])
        if not labels or labels[-1] not in self.view.apps(org):
            return _Outcome(rcode=dns.rcode.NXDOMAIN)
        app = labels[-1]
        started = [m for m in self.view.machines(org, app) if m.started]
        chosen: list[DnsMachine]
        match labels[:-1]:
            case []:
                chosen = sorted(started, key=lambda m: m.id)
            case [machine_id, "vm"]:
                every = self.view.machines(org, app)
                if not any(m.id.lower() == machine_id for m in every):
                    return _Outcome(rcode=dns.rcode.NXDOMAIN)
                chosen = [m for m in started if m.id.lower() == machine_id]
            case [top, "nearest", "of"] if (found := TOP_PATTERN.fullmatch(top)) is not None:
                chosen = _nearest(asker, started)[: int(found.group(1))]
            case [region]:
                chosen = sorted((m for m in started if m.region == region), key=lambda m: m.id)
                if not chosen:
                    return _Outcome(rcode=dns.rcode.NXDOMAIN)
            case _:
                return _Outcome(rcode=dns.rcode.NXDOMAIN)
        if rdtype not in (dns.rdatatype.AAAA, dns.rdatatype.ANY) or not chosen:
            return _Outcome()
        rdatas = [_aaaa(m.address) for m in chosen[: self.max_answers]]
        return _Outcome(answers=[dns.rrset.from_rdata_list(name, TTL_S, rdatas)])

    def _apps_txt(self, name: dns.name.Name, apps: Sequence[str]) -> dns.rrset.RRset:
        text = ",".join(apps[: self.max_answers * 4])
        chunks = [text[i : i + TXT_CHUNK] for i in range(0, len(text), TXT_CHUNK)] or [""]
        quoted = " ".join(f'"{chunk}"' for chunk in chunks)
        return dns.rrset.from_text(name, TTL_S, "IN", "TXT", quoted)


def wire_response(response: dns.message.Message, max_size: int) -> bytes:
    """``response`` in at most ``max_size`` bytes: whole, or with no records and TC set."""
    try:
        return response.to_wire(max_size=max_size)
    except dns.exception.TooBig:
        response.answer.clear()
        response.authority.clear()
        response.additional.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)


def udp_size(query: dns.message.Message) -> int:
    if query.edns < 0:
        return UDP_MIN_SIZE
    return max(UDP_MIN_SIZE, min(query.payload, UDP_MAX_SIZE))


class DnsServer:
    """UDP and TCP on one address and port, answering through a :class:`Resolver`."""

    def __init__(
        self,
        view: DnsView,
        *,
        limits: DnsLimits | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.limits = limits if limits is not None else DnsLimits()
        self.resolver = Resolver(view, self.limits.max_answers)
        self._clock: Clock = clock if clock is not None else SystemClock()
        limits = self.limits
        self._rate = RateLimiter(
            RateLimits(
                default=RateLimit(limits.queries_per_second, limits.burst),
                actions={"total": RateLimit(limits.total_queries_per_second, limits.total_burst)},
            ),
            self._clock,
        )
        self._transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_slots = asyncio.Semaphore(self.limits.max_tcp_connections)
        self.dropped = 0
        """Queries dropped for rate or malformed input (a figure for tests and metrics)."""

    def set_view(self, view: DnsView) -> None:
        self.resolver.view = view

    def _allowed(self, source: Address) -> bool:
        try:
            self._rate.take(str(source), "source", "")
            self._rate.take("", "total", "")
        except RateLimited:
            self.dropped += 1
            return False
        return True

    def answer(self, data: bytes, source: Address, max_size: int | None) -> bytes | None:
        """The reply to one query datagram or TCP message (None: drop it)."""
        if not self._allowed(source):
            return None
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            self.dropped += 1
            return None
        if query.flags & dns.flags.QR:
            self.dropped += 1
            return None
        response = self.resolver.resolve(query, source)
        return wire_response(response, max_size if max_size is not None else udp_size(query))

    async def start(self, host: str, port: int) -> tuple[int, int]:
        """Listen on ``host`` (an address on this host) for UDP and TCP; return the ports
        (``port`` 0 picks a free one for UDP, and TCP takes the same number)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ip_address(host).version == 6 else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=(host, port), family=family
        )
        self._transport = transport
        udp_port = int(transport.get_extra_info("sockname")[1])
        try:
            self._tcp = await asyncio.start_server(
                self._serve_tcp, host, udp_port, family=family, reuse_address=True
            )
        except OSError:
            transport.close()
            raise
        return udp_port, udp_port

    async def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = ip_address(writer.get_extra_info("peername")[0])
        if self._tcp_slots.locked():
            writer.close()
            return
        async with self._tcp_slots:
            try:
                for _ in range(self.limits.max_tcp_queries):
                    async with asyncio.timeout(self.limits.tcp_idle_s):
                        (length,) = struct.unpack("!H", await reader.readexactly(2))
                        data = await reader.readexactly(length)
                    reply = self.answer(data, source, TCP_MAX_SIZE)
                    if reply is None:
                        break
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        source = ip_address(str(addr[0]).split("%", 1)[0])
        try:
            reply = self._server.answer(data, source, None)
        except Exception:
            log.exception("internal DNS failed to answer %s", source)
            return
        if reply is not None and self._transport is not None:
            self._transport.sendto(reply, addr)
