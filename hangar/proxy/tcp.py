"""Raw byte relays: TCP passthrough, TLS-terminated TCP (app by SNI), and UDP by client address.

A TCP connection is balanced once, when it opens, and holds its machine's load until it closes;
bytes flow both ways with back-pressure and half-close where the transport allows it. UDP keeps
one flow per client address (at most ``max_udp_flows``, each closed after
``udp_flow_timeout_s`` without a datagram).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from hangar.errors import ServiceUnavailable
from hangar.proxy.balancer import Pool
from hangar.proxy.listener import Listener
from hangar.proxy.routes import Member
from hangar.proxy.tls import sni_app

log = logging.getLogger(__name__)
MAX_EARLY_BYTES = 256 * 1024


class TcpClientProtocol(asyncio.Protocol):
    def __init__(self, listener: Listener, by_sni: bool) -> None:
        self.listener = listener
        self.by_sni = by_sni
        self.transport: asyncio.Transport | None = None
        self.upstream: TcpUpstreamProtocol | None = None
        self.pool: Pool | None = None
        self.member: Member | None = None
        self.early: list[bytes] = []
        self.early_bytes = 0
        self.eof = False
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.listener.connections += 1
        if self.listener.connections > self.listener.settings.max_connections:
            transport.close()
            return
        if self.by_sni:
            found = self.listener.route(sni_app(transport.get_extra_info("ssl_object")))
        else:
            found = self.listener.only_route()
        if found is None:
            transport.close()
            return
        self.pool = found[1]
        self.transport.pause_reading()
        self.task = asyncio.get_running_loop().create_task(self._connect(found[1]))

    async def _connect(self, pool: Pool) -> None:
        try:
            member = await pool.acquire()
        except ServiceUnavailable as exc:
            log.info("proxy closed a connection: %s", exc)
            self._close()
            return
        self.member = member
        host, port = member.address
        try:
            async with asyncio.timeout(self.listener.settings.connect_timeout_s):
                _, upstream = await asyncio.get_running_loop().create_connection(
                    lambda: TcpUpstreamProtocol(self), host, port
                )
        except (OSError, TimeoutError) as exc:
            log.info("machine %s did not accept a connection: %s", member.id, exc)
            self._close()
            return
        if self.transport is None or self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        assert upstream.transport is not None
        for piece in self.early:
            upstream.transport.write(piece)
        self.early = []
        if self.eof and upstream.transport.can_write_eof():
            upstream.transport.write_eof()
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.write(data)
            return
        self.early.append(data)
        self.early_bytes += len(data)
        if self.early_bytes > MAX_EARLY_BYTES:
            self._close()

    def eof_received(self) -> bool:
        self.eof = True
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            if upstream.transport.can_write_eof():
                upstream.transport.write_eof()
                return True
            upstream.transport.close()
        return False

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections -= 1
        self.transport = None
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.upstream is not None:
            self.upstream.close()
        if self.member is not None and self.pool is not None:
            self.pool.release(self.member)
            self.member = None

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class TcpUpstreamProtocol(asyncio.Protocol):
    def __init__(self, client: TcpClientProtocol) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

    def eof_received(self) -> bool:
        client = self.client.transport
        if client is not None:
            if client.can_write_eof():
                client.write_eof()
                return True
            client.close()
        return False

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.client._close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UdpRelay(asyncio.DatagramProtocol):
    """One UDP port: each client address gets a flow to one machine, balanced when it starts."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[Any, UdpFlow] = {}
        self.starting: set[Any] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        flow = self.flows.get(addr)
        if flow is not None:
            flow.send(data)
            return
        if addr in self.starting:
            return  # dropped while its flow opens, as a busy UDP path would
        if len(self.flows) + len(self.starting) >= self.listener.settings.max_udp_flows:
            return
        found = self.listener.only_route()
        if found is None:
            return
        self.starting.add(addr)
        asyncio.get_running_loop().create_task(self._open(addr, found[1], data))

    async def _open(self, addr: Any, pool: Pool, first: bytes) -> None:
        try:
            member = await pool.acquire()
        except ServiceUnavailable:
            self.starting.discard(addr)
            return
        try:
            _, flow = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: UdpFlow(self, addr, pool, member), remote_addr=member.address
            )
        except OSError:
            pool.release(member)
            self.starting.discard(addr)
            return
        self.starting.discard(addr)
        self.flows[addr] = flow
        flow.send(first)

    def reply(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def close(self) -> None:
        for flow in list(self.flows.values()):
            flow.close()
        if self.transport is not None:
            self.transport.close()


class UdpFlow(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, addr: Any, pool: Pool, member: Member) -> None:
        self.relay = relay
        self.addr = addr
        self.pool = pool
        self.member: Member | None = member
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._touch()

    def _touch(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        timeout = self.relay.listener.settings.udp_flow_timeout_s
        self.timer = asyncio.get_running_loop().call_later(timeout, self.close)

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.sendto(data)
            self._touch()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.relay.reply(data, self.addr)
        self._touch()

    def error_received(self, exc: Exception) -> None:
        log.debug("udp flow to %s: %s", self.member.id if self.member else "?", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.relay.flows.pop(self.addr, None)
        if self.member is not None:
            self.pool.release(self.member)
            self.member = None
        if self.transport is not None:
            transport, self.transport = self.transport, None
            with contextlib.suppress(Exception):
                transport.close()
