"""The internal DNS service: the resolver over a view (pure), and the server on real loopback
sockets (UDP and TCP) with dnspython as the client."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from ipaddress import IPv6Address

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from hangar.clock import ManualClock
from hangar.model.config import MachineConfig
from hangar.model.machine import Machine, MachineState
from hangar.net.dns import (
    UDP_MIN_SIZE,
    DnsLimits,
    DnsMachine,
    DnsServer,
    Resolver,
    SnapshotView,
    view_from_records,
)

ASKER_A = IPv6Address("fdaa:0:a::1")
ASKER_A_FAR = IPv6Address("fdaa:0:a::2")
ASKER_B = IPv6Address("fdaa:0:b::1")
W1 = DnsMachine("w1", "web", "acme", "ams", "h1", IPv6Address("fdaa:0:a:1::11"), True)
W2 = DnsMachine("w2", "web", "acme", "fra", "h2", IPv6Address("fdaa:0:a:2::12"), True)
W3 = DnsMachine("w3", "web", "acme", "ams", "h1", IPv6Address("fdaa:0:a:1::13"), False)
C1 = DnsMachine("c1", "client", "acme", "ams", "h1", ASKER_A, True)
C2 = DnsMachine("c2", "client", "acme", "fra", "h2", ASKER_A_FAR, True)
O1 = DnsMachine("o1", "other", "globex", "ams", "h1", ASKER_B, True)
VIEW = SnapshotView(
    {"acme": ["web", "client", "idle"], "globex": ["other"]}, [W1, W2, W3, C1, C2, O1]
)


def ask(name: str, rdtype: str = "AAAA", source: IPv6Address = ASKER_A) -> dns.message.Message:
    return Resolver(VIEW).resolve(dns.message.make_query(name, rdtype), source)


def addresses(response: dns.message.Message) -> list[str]:
    return [item.address for rrset in response.answer for item in rrset]


def test_an_app_name_lists_its_started_machines() -> None:
    response = ask("web.internal")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert addresses(response) == [str(W1.address), str(W2.address)]


def test_names_are_case_insensitive() -> None:
    assert addresses(ask("WEB.Internal.")) == addresses(ask("web.internal"))


def test_a_machine_by_id() -> None:
    assert addresses(ask("w2.vm.web.internal")) == [str(W2.address)]
    stopped = ask("w3.vm.web.internal")
    assert stopped.rcode() == dns.rcode.NOERROR and addresses(stopped) == []
    assert ask("nope.vm.web.internal").rcode() == dns.rcode.NXDOMAIN
    assert ask("c1.vm.web.internal").rcode() == dns.rcode.NXDOMAIN


def test_machines_by_region() -> None:
    assert addresses(ask("ams.web.internal")) == [str(W1.address)]
    assert addresses(ask("fra.web.internal")) == [str(W2.address)]
    assert ask("syd.web.internal").rcode() == dns.rcode.NXDOMAIN


def test_nearest_machines_come_from_the_askers_host_then_region() -> None:
    assert addresses(ask("top1.nearest.of.web.internal")) == [str(W1.address)]
    assert addresses(ask("top1.nearest.of.web.internal", source=ASKER_A_FAR)) == [str(W2.address)]
    assert addresses(ask("top5.nearest.of.web.internal")) == [str(W1.address), str(W2.address)]
    assert ask("top0.nearest.of.web.internal").rcode() == dns.rcode.NXDOMAIN


def test_the_apps_of_the_org_only() -> None:
    response = ask("_apps.internal", "TXT")
    [rrset] = response.answer
    assert [b"".join(item.strings) for item in rrset] == [b"client,idle,web"]
    [other] = ask("_apps.internal", "TXT", source=ASKER_B).answer
    assert [b"".join(item.strings) for item in other] == [b"other"]


def test_another_orgs_names_are_exactly_like_names_that_do_not_exist() -> None:
    for name in ("web.internal", "w1.vm.web.internal", "ams.web.internal"):
        foreign = ask(name, source=ASKER_B)
        assert foreign.rcode() == dns.rcode.NXDOMAIN and foreign.answer == []
        missing = ask(name.replace("web", "nosuchapp"), source=ASKER_B)
        assert foreign.authority == missing.authority
        assert foreign.flags == missing.flags


def test_an_existing_name_without_that_type_is_empty_with_the_zone_soa() -> None:
    for name, rdtype in (
        ("web.internal", "A"),
        ("_apps.internal", "AAAA"),
        ("idle.internal", "AAAA"),
    ):
        response = ask(name, rdtype)
        assert response.rcode() == dns.rcode.NOERROR and response.answer == []
        assert response.authority[0].rdtype == dns.rdatatype.SOA


def test_outside_names_and_unknown_askers_are_refused() -> None:
    assert ask("example.com").rcode() == dns.rcode.REFUSED
    assert ask("web.internal", source=IPv6Address("fdaa:0:c::9")).rcode() == dns.rcode.REFUSED


def record(machine_id: str, app: str, state: MachineState, private_ip: str) -> Machine:
    return Machine(
        id=machine_id,
        name=machine_id,
        app=app,
        state=state,
        region="ams",
        instance_id="i",
        version=1,
        config=MachineConfig(image="busybox"),
        private_ip=private_ip,
        created_at=0,
        updated_at=0,
        host_id="h1",
    )


def test_a_view_over_store_records() -> None:
    view = view_from_records(
        {"web": "acme", "client": "acme", "other": "globex"},
        [
            record("w1", "web", MachineState.STARTED, str(W1.address)),
            record("w3", "web", MachineState.STOPPED, str(W3.address)),
            record("c1", "client", MachineState.STARTED, str(ASKER_A)),
            record("new", "web", MachineState.CREATED, ""),
            record("gone", "deleted-app", MachineState.STARTED, "fdaa:0:9::1"),
        ],
    )
    resolver = Resolver(view)
    query = dns.message.make_query("web.internal", "AAAA")
    assert addresses(resolver.resolve(query, ASKER_A)) == [str(W1.address)]
    assert view.apps("acme") == ["client", "web"]
    assert view.asker(IPv6Address("fdaa:0:9::1")) is None


def big_view(count: int) -> SnapshotView:
    machines = [
        DnsMachine(f"m{i}", "big", "acme", "ams", "h1", IPv6Address(f"fdaa:0:a:3::{i + 1:x}"), True)
        for i in range(count)
    ]
    return SnapshotView({"acme": ["big"]}, [C1, *machines])


def test_answers_are_capped_and_truncated_to_the_udp_size() -> None:
    server = DnsServer(big_view(200), limits=DnsLimits(max_answers=40))
    query = dns.message.make_query("big.internal", "AAAA")

    udp = dns.message.from_wire(server.answer(query.to_wire(), ASKER_A, None) or b"")
    tcp = dns.message.from_wire(server.answer(query.to_wire(), ASKER_A, 65535) or b"")

    assert udp.flags & dns.flags.TC and udp.answer == []
    assert len(server.answer(query.to_wire(), ASKER_A, None) or b"") <= UDP_MIN_SIZE
    assert len(addresses(tcp)) == 40 and not tcp.flags & dns.flags.TC


def test_each_source_is_rate_limited_by_the_clock() -> None:
    clock = ManualClock()
    server = DnsServer(VIEW, limits=DnsLimits(queries_per_second=1, burst=3), clock=clock)
    wire = dns.message.make_query("web.internal", "AAAA").to_wire()

    answered = [server.answer(wire, ASKER_A, None) is not None for _ in range(5)]
    other_source = server.answer(wire, ASKER_A_FAR, None)
    clock.advance(1.0)

    assert answered == [True, True, True, False, False]
    assert other_source is not None
    assert server.answer(wire, ASKER_A, None) is not None
    assert server.dropped == 2


def test_all_sources_together_are_rate_limited_too() -> None:
    clock = ManualClock()
    limits = DnsLimits(burst=10, total_queries_per_second=1, total_burst=2)
    server = DnsServer(VIEW, limits=limits, clock=clock)
    wire = dns.message.make_query("web.internal", "AAAA").to_wire()

    answered = [
        server.answer(wire, source, None) is not None for source in (ASKER_A, ASKER_B, ASKER_A_FAR)
    ]

    assert answered == [True, True, False]


def test_garbage_and_responses_are_dropped() -> None:
    server = DnsServer(VIEW)
    response = dns.message.make_response(dns.message.make_query("web.internal", "AAAA"))
    assert server.answer(b"\x00\x01garbage", ASKER_A, None) is None
    assert server.answer(response.to_wire(), ASKER_A, None) is None
    assert server.dropped == 2


# real sockets on loopback: the asker is the machine at ::1

LOOPBACK_MACHINE = DnsMachine("l1", "web", "acme", "ams", "h1", IPv6Address("::1"), True)


@pytest.fixture
async def server() -> AsyncIterator[tuple[DnsServer, int]]:
    view = SnapshotView({"acme": ["web"]}, [LOOPBACK_MACHINE, W1])
    server = DnsServer(view, limits=DnsLimits(max_tcp_connections=1, tcp_idle_s=0.2))
    udp_port, tcp_port = await server.start("::1", 0)
    assert udp_port == tcp_port
    try:
        yield server, udp_port
    finally:
        await server.stop()


async def test_udp_and_tcp_answer_the_same(server: tuple[DnsServer, int]) -> None:
    _, port = server
    query = dns.message.make_query("web.internal", "AAAA")
    over_udp = await dns.asyncquery.udp(query, "::1", port=port, timeout=5)
    over_tcp = await dns.asyncquery.tcp(query, "::1", port=port, timeout=5)
    expected = sorted([str(W1.address), "::1"])
    assert sorted(addresses(over_udp)) == expected == sorted(addresses(over_tcp))


async def test_a_view_swap_takes_effect_at_once(server: tuple[DnsServer, int]) -> None:
    dns_server, port = server
    dns_server.set_view(SnapshotView({"acme": []}, [LOOPBACK_MACHINE]))
    query = dns.message.make_query("web.internal", "AAAA")
    response = await dns.asyncquery.udp(query, "::1", port=port, timeout=5)
    assert response.rcode() == dns.rcode.NXDOMAIN


async def test_tcp_connections_are_bounded_and_idle_ones_closed(
    server: tuple[DnsServer, int],
) -> None:
    _, port = server
    reader, writer = await asyncio.open_connection("::1", port)
    try:
        query = dns.message.make_query("web.internal", "AAAA").to_wire()
        writer.write(struct.pack("!H", len(query)) + query)
        (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
        await asyncio.wait_for(reader.readexactly(length), 5)
        # A second connection while the first is open: closed without an answer.
        second_reader, second_writer = await asyncio.open_connection("::1", port)
        assert await asyncio.wait_for(second_reader.read(), 5) == b""
        second_writer.close()
        # The first, left idle, is closed by the server.
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


def test_one_machine_put_into_a_view_replaces_or_removes_only_it() -> None:
    view = SnapshotView({"acme": ["web"]}, [LOOPBACK_MACHINE, W1])
    moved = DnsMachine("l1", "api", "acme", "ams", "h1", IPv6Address("fd00::9"), False)

    view.put("l1", moved)

    assert view.asker(IPv6Address("::1")) is None
    assert view.asker(IPv6Address("fd00::9")) == moved
    assert view.machines("acme", "web") == [W1]
    assert view.machines("acme", "api") == [moved]
    assert view.apps("acme") == ["api", "web"]
    view.put("l1", None)
    view.put("never-there", None)
    assert view.asker(IPv6Address("fd00::9")) is None
    assert view.machines("acme", "api") == []
    assert view.machines("acme", "web") == [W1]
