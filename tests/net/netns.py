"""Network namespaces as stand-in machines for the firewall tests: a veth pair whose host end
carries the machine's tap name (the ruleset matches on it) and whose other end is the
namespace's ``eth0`` with the machine's MAC and addresses, configured as hangar's guest init
would. Also an "outside" namespace behind a veth, as the egress interface."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

from hangar.net.addressing import GATEWAY_LINK_LOCAL, HOST_PREFIX_LEN, AddressPlan
from hangar.net.attachment import Attachment
from hangar.net.dns import DnsServer, DnsView
from hangar.net.links import write_sysctl

COMMAND_TIMEOUT_S = 30.0


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=check
    )


def in_ns(ns: str, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *argv, check=check)


@dataclass(frozen=True)
class NsMachine:
    ns: str
    attachment: Attachment

    def sh(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return in_ns(self.ns, *argv)

    def ping(self, address: object, *, source: object | None = None) -> bool:
        argv = ["busybox", "ping", "-c", "1", "-W", "2"]
        if source is not None:
            argv += ["-I", str(source)]
        return self.sh(*argv, str(address)).returncode == 0

    def fetch(self, url: str) -> str | None:
        """The body at ``url``, or None if it cannot be fetched within a few seconds.
        (busybox wget's own ``-T`` crashes on a failed connection: ``timeout`` bounds it.)"""
        done = self.sh(
            "busybox", "timeout", "-s", "KILL", "3", "busybox", "wget", "-q", "-O", "-", url
        )
        assert done.returncode not in (139, -11), f"wget crashed fetching {url}"
        return done.stdout if done.returncode == 0 else None


@contextlib.contextmanager
def ns_machine(attachment: Attachment, bridge: str, plan: AddressPlan) -> Iterator[NsMachine]:
    """A namespace attached to ``bridge`` as the machine of ``attachment``."""
    ns = f"{attachment.tap}-ns"
    peer = attachment.tap[:-1] + "p"
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", attachment.tap, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", peer, "netns", ns)
        write_sysctl(f"ipv6/conf/{attachment.tap}/disable_ipv6", "1")
        run("ip", "link", "set", attachment.tap, "master", bridge, "up")
        guest = NsMachine(ns, attachment)
        for argv in (
            ("ip", "link", "set", peer, "name", "eth0"),
            ("ip", "link", "set", "eth0", "address", attachment.mac),
            ("sysctl", "-q", "-w", "net.ipv6.conf.eth0.accept_dad=0"),
            ("ip", "link", "set", "lo", "up"),
            ("ip", "link", "set", "eth0", "up"),
            ("ip", "-6", "addr", "add", f"{attachment.ip6}/{HOST_PREFIX_LEN}", "dev", "eth0"),
            ("ip", "-6", "route", "add", "default", "via", str(GATEWAY_LINK_LOCAL), "dev", "eth0"),
        ):
            in_ns(ns, *argv, check=True)
        if attachment.ip4 is not None:
            length = plan.egress_subnet.prefixlen
            in_ns(ns, "ip", "addr", "add", f"{attachment.ip4}/{length}", "dev", "eth0", check=True)
            in_ns(ns, "ip", "route", "add", "default", "via", str(plan.egress_gateway), check=True)
        yield guest
    finally:
        run("ip", "link", "del", attachment.tap, check=False)
        run("ip", "netns", "del", ns, check=False)


@dataclass(frozen=True)
class Outside:
    """A namespace standing for the world beyond the egress interface."""

    ns: str
    host_side: IPv4Interface
    far_side: IPv4Interface


@contextlib.contextmanager
def outside(interface: str, subnet: IPv4Network) -> Iterator[Outside]:
    """A veth ``interface`` on the host to a namespace holding the other end of ``subnet``."""
    ns = f"{interface}-ns"
    peer = interface[:-1] + "q"
    hosts = list(subnet.hosts())
    host_side = IPv4Interface(f"{hosts[0]}/{subnet.prefixlen}")
    far_side = IPv4Interface(f"{hosts[1]}/{subnet.prefixlen}")
    run("ip", "netns", "add", ns)
    try:
        run("ip", "link", "add", interface, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", peer, "netns", ns)
        run("ip", "addr", "add", str(host_side), "dev", interface)
        run("ip", "link", "set", interface, "up")
        in_ns(ns, "ip", "link", "set", "lo", "up", check=True)
        in_ns(ns, "ip", "addr", "add", str(far_side), "dev", peer, check=True)
        in_ns(ns, "ip", "link", "set", peer, "up", check=True)
        yield Outside(ns, host_side, far_side)
    finally:
        run("ip", "link", "del", interface, check=False)
        run("ip", "netns", "del", ns, check=False)


class _PeerEcho(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{self.server.name} saw {self.client_address[0]}\n".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


class _DualStackServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


@contextlib.contextmanager
def http_listener(name: str, host: str = "::") -> Iterator[int]:
    """An HTTP server on ``host`` (default: every address, IPv4 too), a free port; each reply
    says ``NAME saw CLIENT``."""
    server = _DualStackServer((host, 0), _PeerEcho)
    server.name = name  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


PEER_CGI = """#!/bin/busybox sh
echo "Content-Type: text/plain"
echo
echo "outside saw $REMOTE_ADDR"
"""


@contextlib.contextmanager
def ns_http_listener(ns: str, address: IPv4Address, port: int) -> Iterator[None]:
    """``busybox httpd`` in namespace ``ns``; ``/cgi-bin/peer`` answers with the client's
    address as the namespace sees it."""
    folder = Path(tempfile.mkdtemp(prefix="hangar-net-"))
    script = folder / "cgi-bin" / "peer"
    script.parent.mkdir()
    script.write_text(PEER_CGI)
    script.chmod(0o755)
    argv = ["busybox", "httpd", "-f", "-p", f"{address}:{port}", "-h", str(folder)]
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


class BackgroundDns:
    """A :class:`DnsServer` running on its own event loop thread."""

    def __init__(self, view: DnsView) -> None:
        self.server = DnsServer(view)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self, host: str, port: int) -> int:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self.server.start(host, port), self._loop)
        return future.result(timeout=COMMAND_TIMEOUT_S)[0]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(
            timeout=COMMAND_TIMEOUT_S
        )
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=COMMAND_TIMEOUT_S)
        self._loop.close()
