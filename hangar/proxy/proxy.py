"""``Proxy``: follows a ``Backends`` and keeps the host's listeners, routes and pools in step.

Each snapshot is planned (``plan_routes``); listeners open for new ports and close for ports no
app publishes any more; pools keep their load across snapshots. A port that cannot be bound is
named in ``problems`` and retried on the next snapshot. The autostop pass runs on the injected
clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from hangar.clock import Clock, SystemClock
from hangar.proxy.backends import BackendMachine, Backends
from hangar.proxy.balancer import Pool
from hangar.proxy.http import HttpClientProtocol, UpstreamProtocol, Upstreams
from hangar.proxy.listener import Listener
from hangar.proxy.routes import RoutePlan, plan_routes
from hangar.proxy.scaler import Scaler, port_accepts
from hangar.proxy.settings import ProxySettings
from hangar.proxy.tcp import TcpClientProtocol, UdpRelay
from hangar.proxy.tls import CertStore, sni_app

log = logging.getLogger(__name__)
LISTEN_BACKLOG = 1024


class Proxy:
    def __init__(
        self,
        backends: Backends,
        settings: ProxySettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.backends = backends
        self.settings = settings or ProxySettings()
        self.clock = clock or SystemClock()
        self.certs = CertStore(
            self.settings.domain,
            self.settings.state_dir,
            self.settings.tls_cert,
            self.settings.tls_key,
        )
        self.upstreams = Upstreams(self.settings)
        self.scaler = Scaler(backends, self.settings, self.clock)
        self.scaler.on_ready = self._notify_pools
        self.scaler.probe = self._probe
        self.listeners: dict[int, Listener] = {}
        self.pools: dict[tuple[str, int], Pool] = {}
        self.plan = RoutePlan()
        self.problems: dict[int, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._first: asyncio.Future[None] | None = None

    # lifecycle
    async def start(self) -> None:
        """Start following the backends; returns once the first snapshot is applied."""
        loop = asyncio.get_running_loop()
        self._first = loop.create_future()
        self._tasks = [
            loop.create_task(self._follow()),
            loop.create_task(self.scaler.run_autostop()),
        ]
        await asyncio.shield(self._first)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.scaler.close()
        for port in list(self.listeners):
            self._close_listener(port)
        self.upstreams.close_all()

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def host_port(self, service_port: int) -> int:
        """Where the listener for ``service_port`` is bound on the host."""
        return self.listeners[service_port].host_port

    @property
    def conflicts(self) -> list[str]:
        return list(self.plan.conflicts)

    # following the backends
    async def _follow(self) -> None:
        try:
            async for machines in self.backends.watch():
                await self.apply(machines)
        except Exception as exc:
            if self._first is not None and not self._first.done():
                self._first.set_exception(exc)
            raise

    async def apply(self, machines: Sequence[BackendMachine]) -> None:
        self.scaler.update(machines)
        plan = plan_routes(machines)
        for conflict in set(plan.conflicts) - set(self.plan.conflicts):
            log.warning("proxy: %s", conflict)
        self.plan = plan
        live: set[tuple[str, int]] = set()
        for port, port_plan in plan.ports.items():
            listener = self.listeners.get(port)
            if listener is not None and listener.kind != port_plan.kind:
                self._close_listener(port)
                listener = None
            if listener is None:
                listener = await self._open_listener(port, port_plan.kind, set(port_plan.routes))
                if listener is None:
                    continue
            elif listener.kind == "tls" and set(port_plan.routes) != set(listener.routes):
                self._set_tls_apps(listener, set(port_plan.routes))
            routes = {}
            for app, route in port_plan.routes.items():
                key = (app, port)
                live.add(key)
                pool = self.pools.get(key)
                if pool is None:
                    pool = self.pools[key] = Pool(route, self.scaler, self.settings)
                else:
                    pool.update(route)
                routes[app] = (route, pool)
            listener.routes = routes
        for key in set(self.pools) - live:
            self.pools.pop(key).notify(everyone=True)
        for port in set(self.listeners) - set(plan.ports):
            self._close_listener(port)
        if self._first is not None and not self._first.done():
            self._first.set_result(None)

    async def _probe(self, host: str, port: int, http: bool) -> bool:
        """Whether a woken machine's port accepts; for HTTP the connection is kept in the
        upstream pool, so the request waiting for the machine goes out on it at once."""
        if not http:
            return await port_accepts(host, port, self.settings.connect_timeout_s)
        address = (host, port)
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                _, upstream = await asyncio.get_running_loop().create_connection(
                    lambda: UpstreamProtocol(self.upstreams, address), host, port
                )
        except (OSError, TimeoutError):
            return False
        self.upstreams.give(address, upstream)
        return True

    def _notify_pools(self) -> None:
        for pool in self.pools.values():
            pool.notify(everyone=True)

    # listeners
    def _bind(self, port: int, kind: str) -> socket.socket:
        host = self.settings.bind_host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        sock = socket.socket(family, sock_type)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, self.settings.host_port(port)))
            if kind != "udp":
                sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def _open_listener(self, port: int, kind: Any, apps: set[str]) -> Listener | None:
        listener = Listener(port, kind, self.settings, self.certs, self.upstreams)
        loop = asyncio.get_running_loop()
        try:
            sock = self._bind(port, kind)
        except OSError as exc:
            problem = f"cannot listen on port {self.settings.host_port(port)}: {exc}"
            if self.problems.get(port) != problem:
                log.error("proxy: %s", problem)
            self.problems[port] = problem
            return None
        self.problems.pop(port, None)
        listener.host_port = sock.getsockname()[1]
        if kind == "udp":
            _, relay = await loop.create_datagram_endpoint(lambda: UdpRelay(listener), sock=sock)
            listener.server = relay
        elif kind == "http":
            listener.server = await loop.create_server(
                lambda: HttpClientProtocol(listener, "http"), sock=sock
            )
        elif kind == "tcp":
            listener.server = await loop.create_server(
                lambda: TcpClientProtocol(listener, by_sni=False), sock=sock
            )
        else:
            context = self.certs.listener_context(apps)
            listener.server = await loop.create_server(
                lambda: TlsDispatchProtocol(listener), sock=sock, ssl=context
            )
            listener.tls_context = context
        self.listeners[port] = listener
        log.info("proxy: %s on port %d (host port %d)", kind, port, listener.host_port)
        return listener

    def _set_tls_apps(self, listener: Listener, apps: set[str]) -> None:
        context = listener.tls_context
        if isinstance(context, ssl.SSLContext):
            fresh = self.certs.listener_context(apps)
            context.sni_callback = fresh.sni_callback

    def _close_listener(self, port: int) -> None:
        listener = self.listeners.pop(port, None)
        if listener is not None and listener.server is not None:
            listener.server.close()


class TlsDispatchProtocol(asyncio.Protocol):
    """A TLS listener's connection: once the handshake has named the app (SNI), it becomes
    HTTP or a raw relay, as that app's handlers say."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        app = sni_app(transport.get_extra_info("ssl_object"))
        found = self.listener.route(app)
        if found is not None and found[0].http:
            self.inner = HttpClientProtocol(self.listener, "https")
        else:
            self.inner = TcpClientProtocol(self.listener, by_sni=True)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        assert self.inner is not None
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        assert self.inner is not None
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)
