"""HTTP/1.1 through the proxy: route by ``Host``, balance per request, stream both bodies.

Client connections are kept alive and may pipeline (requests are answered in order); each
request is sent to a machine over a pooled keep-alive connection (``Upstreams``). Bodies
stream in both directions with back-pressure (a slow reader pauses the other side); chunked
bodies are re-framed, sized ones pass as they are. Hop-by-hop headers are dropped, and
``X-Forwarded-For/-Proto/-Port`` and ``Fly-Client-IP`` are set. Bounded: connections per
listener, header bytes, time to send headers, idle time between requests, time for a machine
to answer. Parsing is httptools (llhttp).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any, cast

import httptools

from hangar.errors import ServiceUnavailable
from hangar.proxy.balancer import Pool
from hangar.proxy.listener import LazyTimer, Listener, simple_response
from hangar.proxy.routes import AppRoute, Member
from hangar.proxy.settings import ProxySettings

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
SET_BY_PROXY = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-port", b"fly-client-ip"}
)
REQUEST_DROPPED = HOP_BY_HOP | SET_BY_PROXY
REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _dropped(headers: list[tuple[bytes, bytes]], base: frozenset[bytes]) -> frozenset[bytes]:
    """``base`` and the headers a ``Connection`` header names (hop-by-hop too)."""
    tokens: set[bytes] | None = None
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            tokens = tokens or set()
            tokens.update(token.strip().lower() for token in value.split(b","))
    return base if tokens is None else base | tokens


class Exchange:
    """One request and its response."""

    __slots__ = (
        "bodied",
        "body",
        "chunked",
        "client_keep_alive",
        "headers",
        "host",
        "member",
        "method",
        "pool",
        "request_done",
        "response_chunked",
        "response_framed",
        "response_started",
        "retried",
        "route",
        "sent",
        "upstream",
        "url",
        "version",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: bytes | None = None
        self.method = b""
        self.version = "1.1"
        self.chunked = False
        self.client_keep_alive = True
        self.body: list[bytes] = []
        self.bodied = False
        self.request_done = False
        self.route: AppRoute | None = None
        self.pool: Pool | None = None
        self.member: Member | None = None
        self.upstream: UpstreamProtocol | None = None
        self.sent = False
        self.retried = False
        self.response_started = False
        self.response_chunked = False
        self.response_framed = True


class HttpClientProtocol(asyncio.Protocol):
    """One client connection to an HTTP (or TLS-terminated HTTP) listener."""

    def __init__(self, listener: Listener, scheme: str) -> None:
        self.listener = listener
        self.scheme = scheme
        self.settings = listener.settings
        self.upstreams: Upstreams = listener.upstreams
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = b""
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.pending: deque[Exchange] = deque()
        self.outbox: list[bytes] = []
        self.head_bytes = 0
        self.reading_paused = False
        self.writing_paused = False
        self.closed = False
        self.eof = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loop = asyncio.get_running_loop()
        self.timer = LazyTimer(self.loop, self._timed_out)
        self.head_timed = False

    # connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.listener.connections += 1
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b""
        if self.listener.connections > self.settings.max_connections:
            self._fail(503, "too many connections to this port")
            return
        self.timer.set(self.settings.keepalive_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections -= 1
        self.closed = True
        self.timer.cancel()
        for task in self.tasks:
            task.cancel()
        for exchange in [self.active, *self.pending]:
            if exchange is not None:
                self._drop_exchange(exchange)
        self.active = None
        self.pending.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True
        upstream = self.active.upstream if self.active else None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        upstream = self.active.upstream if self.active else None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported by hangar's proxy yet")
        except httptools.HttpParserError as exc:
            if self.head_bytes > self.settings.max_header_bytes:
                self._fail(431, "request headers too large")
            else:
                self._fail(400, f"malformed request: {exc}")
            return
        if self.parsing is not None and self.active is None and not self.head_timed:
            # A request whose headers did not come whole: they have header_timeout_s in all.
            self.head_timed = True
            self.timer.set(self.settings.header_timeout_s)

    def eof_received(self) -> bool:
        # A client that half-closes after its request still gets its response, then the end.
        self.eof = True
        return self.active is not None

    # parser callbacks
    def on_message_begin(self) -> None:
        self.parsing = Exchange()
        self.head_bytes = 0
        self.head_timed = False

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.head_bytes += len(url)
        if self.head_bytes > self.settings.max_header_bytes:
            raise ValueError("headers too large")
        self.parsing.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.parsing is not None
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.settings.max_header_bytes:
            raise ValueError("headers too large")
        self.parsing.headers.append((name, value))

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        parser = self.parser
        exchange.method = parser.get_method()
        exchange.version = parser.get_http_version()
        exchange.client_keep_alive = parser.should_keep_alive()
        for name, value in exchange.headers:
            lower = name.lower()
            if lower == b"host":
                exchange.host = value
            elif lower == b"transfer-encoding" and b"chunked" in value.lower():
                exchange.chunked = True
        if self.active is None:
            self.timer.clear()
            self.active = exchange
            self._start(exchange)
        else:
            self.pending.append(exchange)
            if len(self.pending) > 8:
                self._pause_reading()

    def on_body(self, data: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.bodied = True
        upstream = exchange.upstream
        if exchange.sent and upstream is not None and upstream.transport is not None:
            upstream.transport.write(_chunk(data) if exchange.chunked else data)
        else:
            exchange.body.append(data)
            self._pause_reading()

    def on_message_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.request_done = True
        self.parsing = None
        upstream = exchange.upstream
        if exchange.sent and exchange.chunked and upstream and upstream.transport:
            upstream.transport.write(b"0\r\n\r\n")

    # serving one exchange
    def _start(self, exchange: Exchange) -> None:
        listener = self.listener
        app = listener.app_for_host(exchange.host)
        found = listener.route(app)
        if found is None:
            name = (exchange.host or b"").decode("latin-1")
            self._fail(404, f"no app answers to {name!r} on this port")
            return
        route, pool = found
        exchange.route, exchange.pool = route, pool
        if route.force_https and self.scheme == "http":
            location = b"https://" + (exchange.host or b"").split(b":")[0] + exchange.url
            self._write(
                b"HTTP/1.1 301 Moved Permanently\r\nlocation: "
                + location
                + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self._close()
            return
        member = pool.try_acquire()
        if member is None:
            self._pause_reading()
            self._spawn(self._acquire_and_send(exchange, pool))
            return
        exchange.member = member
        upstream = self.upstreams.take(member.address)
        if upstream is None:
            self._pause_reading()
            self._spawn(self._connect_and_send(exchange, member))
            return
        self._send(exchange, upstream)

    def _spawn(self, coroutine: Any) -> None:
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _acquire_and_send(self, exchange: Exchange, pool: Pool) -> None:
        try:
            member = await pool.acquire()
        except ServiceUnavailable as exc:
            self._fail(503, str(exc))
            return
        if self.closed:
            pool.release(member)
            return
        exchange.member = member
        upstream = self.upstreams.take(member.address)
        if upstream is None:
            await self._connect_and_send(exchange, member)
        else:
            self._send(exchange, upstream)

    async def _connect_and_send(self, exchange: Exchange, member: Member) -> None:
        host, port = member.address
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                _, upstream = await self.loop.create_connection(
                    lambda: UpstreamProtocol(self.upstreams, member.address), host, port
                )
        except (OSError, TimeoutError) as exc:
            self._fail(502, f"machine {member.id} did not accept the connection: {exc}")
            return
        if self.closed or self.active is not exchange:
            upstream.close()
            return
        self._send(exchange, upstream)

    def _request_head(self, exchange: Exchange) -> bytes:
        drop = _dropped(exchange.headers, REQUEST_DROPPED)
        forwarded_for = b""
        parts = [exchange.method, b" ", exchange.url, b" HTTP/1.1\r\n"]
        for name, value in exchange.headers:
            lower = name.lower()
            if lower in drop:
                if lower == b"x-forwarded-for":
                    forwarded_for = value + b", "
                continue
            parts += (name, b": ", value, b"\r\n")
        parts += (
            b"x-forwarded-for: ",
            forwarded_for,
            self.peer,
            b"\r\nfly-client-ip: ",
            self.peer,
            b"\r\nx-forwarded-proto: ",
            self.scheme.encode(),
            b"\r\nx-forwarded-port: ",
            str(self.listener.port).encode(),
            b"\r\n",
        )
        if exchange.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _send(self, exchange: Exchange, upstream: UpstreamProtocol) -> None:
        if self.closed or upstream.transport is None:
            self._drop_exchange(exchange)
            return
        exchange.upstream = upstream
        upstream.client = self
        upstream.exchange = exchange
        upstream.start_response(exchange.method == b"HEAD")
        data = [self._request_head(exchange)]
        if exchange.chunked:
            data += [_chunk(piece) for piece in exchange.body]
            if exchange.request_done:
                data.append(b"0\r\n\r\n")
        else:
            data += exchange.body
        exchange.body = []
        upstream.transport.write(b"".join(data))
        exchange.sent = True
        upstream.timer.set(self.settings.response_timeout_s)
        if self.writing_paused:
            upstream.transport.pause_reading()
        self._resume_reading()

    # responses, called by the upstream side
    def response_head(
        self, exchange: Exchange, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        if exchange is not self.active or self.transport is None:
            return
        interim = 100 <= status < 200
        chunked = False
        sized = False
        drop = _dropped(headers, HOP_BY_HOP)
        parts = [b"HTTP/1.1 ", str(status).encode(), b" ", reason, b"\r\n"]
        route = exchange.route
        replaced = {name.lower().encode() for name in route.response_headers} if route else set()
        for name, value in headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lower == b"content-length":
                sized = True
            if lower in drop or lower in replaced:
                continue
            parts += (name, b": ", value, b"\r\n")
        if route and route.response_headers:
            for header, setting in route.response_headers.items():
                if setting is False:
                    continue
                values = [setting] if isinstance(setting, str) else setting
                assert isinstance(values, list)
                for text in values:
                    parts += (header.encode(), b": ", text.encode(), b"\r\n")
        if not interim:
            bodiless = exchange.method == b"HEAD" or status in (204, 304)
            exchange.response_chunked = chunked and not bodiless
            exchange.response_framed = chunked or sized or bodiless
            if not exchange.response_framed:
                exchange.client_keep_alive = False
            if exchange.response_chunked:
                parts.append(b"transfer-encoding: chunked\r\n")
            if not exchange.client_keep_alive or not exchange.request_done:
                parts.append(b"connection: close\r\n")
                exchange.client_keep_alive = False
            elif exchange.version == "1.0":
                parts.append(b"connection: keep-alive\r\n")
            exchange.response_started = True
        parts.append(b"\r\n")
        self.outbox.append(b"".join(parts))

    def response_body(self, exchange: Exchange, data: bytes) -> None:
        if exchange is self.active and self.transport is not None:
            self.outbox.append(_chunk(data) if exchange.response_chunked else data)

    def response_done(self, exchange: Exchange, upstream_reusable: bool) -> None:
        if exchange is not self.active:
            return
        if exchange.response_chunked:
            self.outbox.append(b"0\r\n\r\n")
        self.flush()
        upstream = exchange.upstream
        exchange.upstream = None
        self._release(exchange)
        if upstream is not None:
            upstream.client = None
            upstream.exchange = None
            if upstream_reusable and exchange.request_done:
                self.upstreams.give(upstream.address, upstream)
            else:
                upstream.close()
        self.active = None
        if not exchange.client_keep_alive or (self.eof and not self.pending):
            self._close()
            return
        if self.pending:
            following = self.pending.popleft()
            self.active = following
            self._start(following)
        else:
            self.timer.set(self.settings.keepalive_timeout_s)
        self._resume_reading()

    def upstream_failed(self, exchange: Exchange, reason: str, status: int = 502) -> None:
        """The machine's connection broke or timed out before the response ended."""
        if exchange is not self.active:
            return
        upstream = exchange.upstream
        exchange.upstream = None
        if upstream is not None:
            upstream.client = None
            upstream.exchange = None
        if (
            status == 502
            and not exchange.response_started
            and upstream is not None
            and upstream.reused
            and not exchange.retried
            and exchange.request_done
            and not exchange.bodied
            and exchange.member is not None
        ):
            # A pooled connection the machine had just closed: try once on a fresh one.
            exchange.retried = True
            exchange.sent = False
            self._spawn(self._connect_and_send(exchange, exchange.member))
            return
        if not exchange.response_framed and exchange.response_started:
            # The response ran until the machine closed: that is its end.
            self._release(exchange)
            self.active = None
            self._close()
            return
        self._fail(status, reason)

    # helpers
    def _release(self, exchange: Exchange) -> None:
        if exchange.member is not None and exchange.pool is not None:
            exchange.pool.release(exchange.member)
            exchange.member = None

    def _drop_exchange(self, exchange: Exchange) -> None:
        self._release(exchange)
        upstream = exchange.upstream
        exchange.upstream = None
        if upstream is not None:
            upstream.client = None
            upstream.exchange = None
            upstream.close()

    def flush(self) -> None:
        """Send what the response side has gathered: a small response goes out in one write."""
        if self.outbox:
            data = self.outbox[0] if len(self.outbox) == 1 else b"".join(self.outbox)
            self.outbox.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, status: int, message: str) -> None:
        exchange = self.active
        if exchange is not None:
            started = exchange.response_started
            self._drop_exchange(exchange)
            self.active = None
            if started:
                self._abort()
                return
        self.outbox.clear()
        if status >= 500:
            log.info("proxy answered %d: %s", status, message)
        self._write(simple_response(status, REASONS.get(status, "Error"), message))
        self._close()

    def _close(self) -> None:
        self.flush()
        self.timer.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _abort(self) -> None:
        self.timer.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and len(self.pending) <= 8:
            self.reading_paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def _timed_out(self) -> None:
        if self.active is not None:
            return  # the machine's side keeps the time of a request being served
        if self.parsing is not None:
            self._fail(408, "request headers not received in time")
        else:
            self._close()


class Upstreams:
    """Idle keep-alive connections to machines, at most ``upstream_idle_per_machine`` each."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self._idle: dict[tuple[str, int], list[UpstreamProtocol]] = {}

    def take(self, address: tuple[str, int]) -> UpstreamProtocol | None:
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if connection.usable():
                connection.leave_idle()
                return connection
        return None

    def give(self, address: tuple[str, int], connection: UpstreamProtocol) -> None:
        idle = self._idle.setdefault(address, [])
        if len(idle) >= self.settings.upstream_idle_per_machine or not connection.usable():
            connection.close()
            return
        idle.append(connection)
        connection.enter_idle(self.settings.upstream_idle_timeout_s)

    def forget(self, address: tuple[str, int], connection: UpstreamProtocol) -> None:
        idle = self._idle.get(address)
        if idle and connection in idle:
            idle.remove(connection)

    def close_all(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                with contextlib.suppress(Exception):
                    connection.close()
        self._idle.clear()


class UpstreamProtocol(asyncio.Protocol):
    """One connection to a machine's port, carrying one exchange at a time."""

    def __init__(self, upstreams: Upstreams, address: tuple[str, int]) -> None:
        self.upstreams = upstreams
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: HttpClientProtocol | None = None
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.head_bytes = 0
        self.head_only = False
        self.reusable = True
        self.reused = False
        self.idle = False
        self.timer = LazyTimer(asyncio.get_running_loop(), self._timed_out)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.timer.cancel()
        if self.idle:
            self.upstreams.forget(self.address, self)
        self._failed("the machine closed the connection")

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client._pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client._resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:
            # Bytes from a machine while nothing was asked: this connection cannot be trusted.
            self.reusable = False
            self.close()
            return
        client = self.client
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.reusable = False
            self._failed(f"the machine sent a malformed response: {exc}")
            self.close()
        if client is not None:
            client.flush()

    def eof_received(self) -> bool:
        return False

    # the pool's view
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.reusable

    def enter_idle(self, timeout_s: float) -> None:
        self.idle = True
        self.timer.set(timeout_s)

    def leave_idle(self) -> None:
        self.idle = False
        self.reused = True
        self.timer.clear()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def start_response(self, head_only: bool) -> None:
        self.head_only = head_only
        self.headers = []
        self.reason = b""
        self.head_bytes = 0

    def _timed_out(self) -> None:
        if self.idle or self.exchange is None:
            self.close()
            return
        client, exchange = self.client, self.exchange
        self.reusable = False
        if client is not None:
            client.upstream_failed(exchange, "the machine did not answer in time", 504)
        self.close()

    def _failed(self, reason: str) -> None:
        client, exchange = self.client, self.exchange
        if client is not None and exchange is not None:
            client.upstream_failed(exchange, reason)

    # parser callbacks
    def on_status(self, reason: bytes) -> None:
        self.reason += reason
        self.head_bytes += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.upstreams.settings.max_header_bytes:
            raise ValueError("response headers too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.timer.clear()
        client, exchange = self.client, self.exchange
        status = self.parser.get_status_code()
        if not self.parser.should_keep_alive():
            self.reusable = False
        if client is not None and exchange is not None:
            client.response_head(exchange, status, self.reason, self.headers)
            if self.head_only and status >= 200:
                # No body follows a HEAD response, whatever its headers say: this parser
                # would wait for one, so the connection is not reused.
                self.reusable = False
                self.exchange = None
                self.client = None
                client.response_done(exchange, False)
        self.headers = []
        self.reason = b""
        self.head_bytes = 0

    def on_body(self, data: bytes) -> None:
        client, exchange = self.client, self.exchange
        if client is not None and exchange is not None:
            client.response_body(exchange, data)

    def on_message_complete(self) -> None:
        client, exchange = self.client, self.exchange
        if client is None or exchange is None:
            return
        if not exchange.response_started:
            return  # an interim 1xx response: the final one follows
        self.exchange = None
        self.client = None
        client.response_done(exchange, self.reusable)
