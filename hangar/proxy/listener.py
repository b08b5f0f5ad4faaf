"""What every listener's connections share: the port's routes, limits, and the upstream pool."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from hangar.proxy.balancer import Pool
from hangar.proxy.routes import AppRoute, ListenerKind
from hangar.proxy.settings import ProxySettings
from hangar.proxy.tls import CertStore

if TYPE_CHECKING:
    from hangar.proxy.http import Upstreams


class Closable(Protocol):
    def close(self) -> None: ...


@dataclass
class Listener:
    port: int
    """The service port (``services[].ports[].port``)."""
    kind: ListenerKind
    settings: ProxySettings
    certs: CertStore
    upstreams: Upstreams
    routes: dict[str, tuple[AppRoute, Pool]] = field(default_factory=dict)
    host_port: int = 0
    """Where it listens on the host."""
    connections: int = 0
    server: Closable | None = None
    tls_context: ssl.SSLContext | None = None

    def app_for_host(self, host: bytes | None) -> str | None:
        """``Host: web.<domain>:8080`` -> ``web``."""
        if not host:
            return None
        text = host.decode("latin-1")
        if text.startswith("["):
            return None
        return self.certs.app_for(text.rsplit(":", 1)[0] if ":" in text else text)

    def route(self, app: str | None) -> tuple[AppRoute, Pool] | None:
        return None if app is None else self.routes.get(app)

    def only_route(self) -> tuple[AppRoute, Pool] | None:
        """For a raw port: the one app on it."""
        return next(iter(self.routes.values()), None)


def simple_response(status: int, reason: str, message: str, extra: bytes = b"") -> bytes:
    body = (message + "\n").encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


class LazyTimer:
    """One deadline per connection. Moving it later arms no new timer on the loop (the armed
    one re-arms itself when it fires early), so a keep-alive connection costs about one timer
    per request pair instead of several."""

    __slots__ = ("armed_at", "callback", "deadline", "handle", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self.loop = loop
        self.callback = callback
        self.deadline: float | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.armed_at = 0.0

    def set(self, seconds: float) -> None:
        deadline = self.loop.time() + seconds
        self.deadline = deadline
        if self.handle is None or deadline < self.armed_at:
            if self.handle is not None:
                self.handle.cancel()
            self.handle = self.loop.call_at(deadline, self._fire)
            self.armed_at = deadline

    def clear(self) -> None:
        self.deadline = None

    def cancel(self) -> None:
        self.deadline = None
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _fire(self) -> None:
        self.handle = None
        deadline = self.deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:
            self.handle = self.loop.call_at(deadline, self._fire)
            self.armed_at = deadline
            return
        self.deadline = None
        self.callback()
