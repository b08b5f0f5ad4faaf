"""hangar's HTTP servers (the API, an agent's relay, the model gateway): uvicorn, with the
bounds a public listener needs.

- **Connections:** at most ``max_connections`` open at once (and never more than the process's
  file limit allows, which is raised to its hard limit at start); one more is answered 503
  and closed at once, so the server never runs out of file descriptors.
- **Headers:** a connection has ``header_timeout_s`` to send a request's headers, from when it
  opens or its previous response ended; one that trickles them (slowloris) is closed. Idle
  keep-alive connections close after ``keepalive_timeout_s``; a body that stalls between
  chunks is the request guard's (408). Headers are at most :data:`MAX_HEADER_BYTES`.
- **Logs:** refused connections, header timeouts and the event loop's "out of system resource"
  errors are each logged once per episode (:class:`hangar.ratelimit.FloodLog`), and the access
  log quotes at most :data:`ACCESS_LOG_PATH_CHARS` of a path.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from hangar.ratelimit import FloodLog
from hangar.settings import Settings

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
ACCESS_LOG_PATH_CHARS = 200
FD_RESERVE = 256
"""File descriptors kept for everything but API connections (the database, QEMU's files)."""
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: application/json"
    b"\r\ncontent-length: 64\r\n\r\n"
    b'{"error": "too many connections, retry later", "status": "busy"}'
)
assert REFUSAL.endswith(b"}") and len(REFUSAL.split(b"\r\n\r\n", 1)[1]) == 64


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 512
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 5.0

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        """The operator's limits (``HANGAR_MAX_CONNECTIONS`` and the timeouts)."""
        return cls(
            max_connections=settings.max_connections,
            header_timeout_s=settings.header_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
        )


def raise_file_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit from %d: %s", soft, error)
    return soft


def connection_cap(limits: ConnectionLimits, file_limit: int) -> int:
    return max(1, min(limits.max_connections, file_limit - FD_RESERVE))


class _Gate:
    """What every connection of one server shares: the cap and the flood logs."""

    def __init__(self, cap: int, header_timeout_s: float, name: str) -> None:
        self.cap = cap
        self.header_timeout_s = header_timeout_s
        self.refused = FloodLog(log, f"{name} connections past the cap")
        self.slow = FloodLog(log, f"{name} connections too slow to send their headers")


def guarded_protocol(gate: _Gate) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        """uvicorn's HTTP/1.1 protocol with the connection cap and the header deadline."""

        _refused = False
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.server_state.connections) >= gate.cap:
                self._refused = True
                self.transport = transport
                peer = transport.get_extra_info("peername")
                gate.refused.note(str(peer[0]) if peer else "unknown", f"cap {gate.cap}")
                transport.write(REFUSAL)
                transport.close()
                return
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._disarm_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(gate.header_timeout_s, self._too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return
            client = self.client[0] if self.client else "unknown"
            gate.slow.note(client, f"{gate.header_timeout_s:g}s")
            self.transport.close()

    return GuardedH11Protocol


class ClippedAccessLog(logging.Filter):
    """uvicorn's access log with the path cut short (it is the client's to choose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path = args[2]
            if len(path) > ACCESS_LOG_PATH_CHARS:
                clipped = path[:ACCESS_LOG_PATH_CHARS] + f"...({len(path)} chars)"
                record.args = (*args[:2], clipped, *args[3:])
        return True


class OncePerEpisode(logging.Filter):
    """The event loop's "socket.accept() out of system resource" errors, once per episode."""

    MARKER = "out of system resource"

    def __init__(self) -> None:
        super().__init__()
        self._floods = FloodLog(log, "accepting API connections")

    def filter(self, record: logging.LogRecord) -> bool:
        if self.MARKER not in record.getMessage():
            return True
        self._floods.note("the listening socket", "out of file descriptors")
        return False


def install_log_filters() -> None:
    logging.getLogger("uvicorn.access").addFilter(ClippedAccessLog())
    logging.getLogger("asyncio").addFilter(OncePerEpisode())


def server_config(
    app: Any,
    host: str,
    port: int,
    limits: ConnectionLimits,
    log_config: dict[str, Any] | None = None,
    *,
    own_logging: bool = True,
    name: str = "API",
) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` on ``host:port`` with ``limits``; ``log_config``:
    uvicorn's logging configuration (its default if None); ``own_logging=False``: none, for a
    server beside others in a process that set up its logging (uvicorn would set its loggers'
    levels for the whole process); ``name``: the server's, in its log lines."""
    cap = connection_cap(limits, raise_file_limit())
    log.info(
        "%s connections (%s:%d): at most %d, %gs to send headers, %gs idle keep-alive",
        name,
        host,
        port,
        cap,
        limits.header_timeout_s,
        limits.keepalive_timeout_s,
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info" if own_logging else None,
        log_config=(log_config if log_config is not None else LOGGING_CONFIG)
        if own_logging
        else None,
        access_log=own_logging,
        http=guarded_protocol(_Gate(cap, limits.header_timeout_s, name)),
        timeout_keep_alive=max(1, round(limits.keepalive_timeout_s)),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        backlog=min(2048, cap),
    )


def run(
    app: Any,
    host: str,
    port: int,
    limits: ConnectionLimits,
    log_config: dict[str, Any] | None = None,
) -> None:
    config = server_config(app, host, port, limits, log_config)
    server = uvicorn.Server(config)
    # uvicorn configures logging when the server is made: the filters go on afterwards.
    install_log_filters()
    server.run()


class Listener:
    """A server on a socket of its own, on the event loop of the process that runs it (beside
    other work), with ``limits``; ``start`` binds (port 0: a free one) and returns once it
    listens."""

    START_DEADLINE_S = 30.0
    STOP_DEADLINE_S = 30.0

    def __init__(
        self, app: Any, host: str, port: int, limits: ConnectionLimits, name: str = "API"
    ) -> None:
        """``name``: the server's, in its log lines."""
        self.app = app
        self.name = name
        self.host = host
        self.port = port
        self.limits = limits
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> str:
        """Listen; the URL it answers on."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = server_config(
            self.app, self.host, self.port, self.limits, own_logging=False, name=self.name
        )
        server = self._server = uvicorn.Server(config)
        task = self._task = asyncio.create_task(server.serve(sockets=[sock]))
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.START_DEADLINE_S
        while not server.started and not task.done():
            if loop.time() > give_up:
                raise TimeoutError(f"the server on {self.url} did not start listening")
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.STOP_DEADLINE_S)
            except TimeoutError:
                self._task.cancel()
        if self._socket is not None:
            self._socket.close()
