"""The proxy's knobs, each with a bound: what one tenant's traffic may make the host spend."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ProxySettings:
    domain: str = "localhost"
    """Apps answer as ``<app>.<domain>`` (HTTP ``Host``, TLS SNI and generated certificates)."""
    bind_host: str = "0.0.0.0"
    port_map: Mapping[int, int] = field(default_factory=dict)
    """Service port -> host port to listen on (0: any free port); absent ports listen as is."""
    max_connections: int = 4096
    """Open client connections per listener; past it new ones get 503 (HTTP) or are closed."""
    max_header_bytes: int = 64 * 1024
    """Request line and headers of one request; past it: 431."""
    header_timeout_s: float = 10.0
    """From a request's first byte to the end of its headers; past it: 408."""
    keepalive_timeout_s: float = 60.0
    """An idle client connection between requests is closed after this."""
    connect_timeout_s: float = 5.0
    """Connecting to a machine; past it: 502."""
    response_timeout_s: float = 120.0
    """From a request sent to a machine to its response headers; past it: 504."""
    queue_limit: int = 256
    """Requests waiting per app and port when every machine is past its hard limit."""
    queue_timeout_s: float = 2.0
    """How long such a request waits for room before it gets 503."""
    wake_timeout_s: float = 60.0
    """How long a request waits for a stopped machine to start and pass its checks."""
    probe_interval_s: float = 0.01
    """Between connection attempts to a woken machine's port, when it has no checks."""
    idle_stop_s: float = 300.0
    """A machine with no traffic this long is stopped (``autostop``)."""
    autostop_interval_s: float = 15.0
    """How often the autostop pass runs."""
    upstream_idle_per_machine: int = 64
    """Idle keep-alive connections kept to one machine's port."""
    upstream_idle_timeout_s: float = 30.0
    max_udp_flows: int = 1024
    """Distinct client addresses relayed per UDP port at once."""
    udp_flow_timeout_s: float = 60.0
    state_dir: Path | None = None
    """Where generated TLS keys and certificates are cached (mode 0600); None: memory only."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """An operator's certificate and key (for example for ``*.<domain>``), used for every app;
    without one, hangar generates a certificate per app, signed by a CA of its own."""

    def host_port(self, port: int) -> int:
        return self.port_map.get(port, port)
