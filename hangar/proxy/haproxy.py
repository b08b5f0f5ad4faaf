"""HAProxy as the proxy's data path, driven by hangar: a prepared design, not yet the default.

``render_haproxy`` turns the same ``RoutePlan`` the Python proxy serves into an HAProxy
configuration: one frontend per published port (HTTP routed by ``Host``, TLS by SNI, raw TCP),
one backend per app and port, one server per machine with ``maxconn`` = its ``hard_limit``
(HAProxy queues past it, ``timeout queue``, then answers 503), ``balance leastconn`` and
servers that are not ready (stopped, cordoned, failing checks) in maintenance. When an app
autostarts, a ``backup`` server points at hangar's own proxy: a request that finds no machine
up goes there, and hangar holds it, wakes a machine and forwards it, as it does today.
``HaproxyRuntime`` speaks HAProxy's runtime API (its stats socket) so that hangar can put a
server in or out of rotation without a reload (``set server B/S state ready|maint``) and read
each server's sessions (``show stat``) for autostop. UDP stays in hangar (HAProxy has none).
"""

from __future__ import annotations

import csv
import io
import socket
from dataclasses import dataclass
from pathlib import Path

from hangar.proxy.routes import AppRoute, PortPlan, RoutePlan
from hangar.proxy.settings import ProxySettings

MAX_RUNTIME_REPLY = 4 * 1024 * 1024


def backend_name(route: AppRoute) -> str:
    return f"app_{route.app}_{route.port}"


def _server_lines(route: AppRoute, ready: set[str], wake: tuple[str, int] | None) -> list[str]:
    lines = []
    for member in route.members:
        host, port = member.address
        if not host:
            continue
        hard = member.service.limits.hard_limit
        limit = f" maxconn {hard}" if hard else ""
        state = "" if member.id in ready else " disabled"
        lines.append(f"  server {member.id} {host}:{port}{limit}{state}")
    if wake is not None and any(m.service.autostart_on for m in route.members):
        lines.append(f"  server hangar-wake {wake[0]}:{wake[1]} backup")
    return lines


def _http_headers(port: int, scheme: str) -> list[str]:
    return [
        "  option forwardfor",
        f"  http-request set-header X-Forwarded-Proto {scheme}",
        f"  http-request set-header X-Forwarded-Port {port}",
        "  http-request set-header Fly-Client-IP %[src]",
    ]


def _frontend(
    plan: PortPlan, settings: ProxySettings, host_port: int, tls_list: Path | None
) -> list[str]:
    bind = f"  bind {settings.bind_host}:{host_port}"
    lines = [f"frontend port_{plan.port}"]
    if plan.kind == "http":
        lines += ["  mode http", bind, *_http_headers(plan.port, "http")]
        for app, route in sorted(plan.routes.items()):
            acl = f"host_{app}"
            lines.append(
                f"  acl {acl} req.hdr(host),field(1,:),lower -m str {app}.{settings.domain}"
            )
            if route.force_https:
                lines.append(f"  http-request redirect scheme https code 301 if {acl}")
            lines.append(f"  use_backend {backend_name(route)} if {acl}")
        lines.append(f"  default_backend no_app_{plan.port}")
        lines += [
            f"backend no_app_{plan.port}",
            "  mode http",
            '  http-request return status 404 content-type text/plain string "no app"',
        ]
    elif plan.kind == "tls":
        assert tls_list is not None
        lines += ["  mode tcp", f"{bind} ssl crt-list {tls_list}"]
        for app, route in sorted(plan.routes.items()):
            sni = f"{{ ssl_fc_sni -i {app}.{settings.domain} }}"
            lines.append(f"  use_backend {backend_name(route)} if {sni}")
    else:
        route = next(iter(plan.routes.values()))
        lines += ["  mode tcp", bind, f"  default_backend {backend_name(route)}"]
    return lines


def render_haproxy(
    plan: RoutePlan,
    settings: ProxySettings,
    ready: set[str],
    runtime_socket: Path,
    host_ports: dict[int, int] | None = None,
    wake: tuple[str, int] | None = None,
    tls_list: Path | None = None,
) -> str:
    """An HAProxy configuration serving ``plan``. ``ready``: the machine ids in rotation;
    ``host_ports``: where each service port listens (default: ``settings.host_port``);
    ``wake``: hangar's proxy, the backup for apps that autostart; ``tls_list``: a crt-list
    of each app's certificate for TLS ports."""
    ports = host_ports or {}
    lines = [
        "global",
        f"  maxconn {settings.max_connections}",
        f"  stats socket {runtime_socket} mode 600 level admin",
        "defaults",
        f"  timeout connect {settings.connect_timeout_s:g}s",
        f"  timeout client {settings.keepalive_timeout_s:g}s",
        f"  timeout server {settings.response_timeout_s:g}s",
        f"  timeout http-request {settings.header_timeout_s:g}s",
        f"  timeout http-keep-alive {settings.keepalive_timeout_s:g}s",
        f"  timeout queue {settings.queue_timeout_s:g}s",
        "  option http-keep-alive",
        "  http-reuse safe",
    ]
    for port, port_plan in sorted(plan.ports.items()):
        if port_plan.kind == "udp":
            continue  # relayed by hangar itself
        host_port = ports.get(port, settings.host_port(port))
        lines += _frontend(port_plan, settings, host_port, tls_list)
        for route in port_plan.routes.values():
            mode = "http" if route.http else "tcp"
            lines += [f"backend {backend_name(route)}", f"  mode {mode}", "  balance leastconn"]
            if route.http and port_plan.kind == "tls":
                lines += _http_headers(port, "https")
            lines += _server_lines(route, ready, wake)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ServerStat:
    backend: str
    server: str
    status: str
    current_sessions: int
    total_sessions: int
    seconds_since_last_session: int | None


class HaproxyRuntime:
    """HAProxy's runtime API over its stats socket: one command per connection."""

    def __init__(self, path: Path, timeout_s: float = 5.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def command(self, line: str) -> str:
        if "\n" in line:
            raise ValueError("one command per call")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout_s)
            sock.connect(str(self.path))
            sock.sendall(line.encode() + b"\n")
            chunks: list[bytes] = []
            size = 0
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_RUNTIME_REPLY:
                    break
        return b"".join(chunks).decode(errors="replace")

    def set_ready(self, route: AppRoute, machine_id: str, ready: bool) -> None:
        state = "ready" if ready else "maint"
        reply = self.command(f"set server {backend_name(route)}/{machine_id} state {state}")
        if reply.strip():
            raise ValueError(f"haproxy: {reply.strip()}")

    def server_stats(self) -> list[ServerStat]:
        text = self.command("show stat").lstrip("# ")
        stats = []
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("svname") in ("FRONTEND", "BACKEND", None):
                continue
            last = row.get("lastsess") or ""
            stats.append(
                ServerStat(
                    backend=row["pxname"],
                    server=row["svname"],
                    status=row.get("status", ""),
                    current_sessions=int(row.get("scur") or 0),
                    total_sessions=int(row.get("stot") or 0),
                    seconds_since_last_session=int(last) if last.lstrip("-").isdigit() else None,
                )
            )
        return stats
