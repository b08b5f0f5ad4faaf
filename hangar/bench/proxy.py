"""``hangar bench proxy``: hangar's proxy against HAProxy and against no proxy, side by side.

One backend for all three: nginx (one process) in a network namespace joined by a veth pair,
standing in for a guest. wrk drives (a) the backend directly, (b) Debian's HAProxy configured
here (keep-alive to the backend, ``nbthread`` as given) and (c) ``hangar proxy`` as its own
process (uvloop), in rounds, and the medians are printed: requests/s at full load with p50/p99,
then p99 at about half of HAProxy's peak (paced with wrk's ``delay()``) and the latency each
proxy adds there. Last, autostart: the time from a request to a stopped machine's first
response byte through the proxy, against the time from starting the same nginx to its first
response byte with no proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from hangar.bench.netns import NamespaceLink, veth_namespace
from hangar.errors import HangarError
from hangar.proxy.standalone import listening_port, proxy_command

BACKEND_PORT = 8080
DOMAIN = "bench.test"
APP = "web"
READY_TIMEOUT_S = 20.0
WRK_TIMEOUT_S = 120.0
UNLOADED_LATENCY_MS = 0.2
PACE_DELAY_MS = 1
CALIBRATION_ROUNDS = 4
CALIBRATION_SECONDS = 2.0
MAX_PACED_CONNECTIONS = 1000

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 120s;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen {ip}:{port};
    location / {{ return 200 "hello from the backend\\n"; }}
  }}
}}
"""

HAPROXY_CONF = """\
global
  nbthread {threads}
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  option http-keep-alive
  http-reuse always
frontend bench
  bind 127.0.0.1:{port}
  default_backend machine
backend machine
  server guest {ip}:{backend_port}
"""

PACED_SCRIPT = """\
function delay()
  return {delay_ms}
end
"""


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int = 0


@dataclass
class ProxyBenchResult:
    connections: int
    seconds: float
    runs: int
    haproxy_threads: int
    peak: dict[str, list[WrkResult]] = field(default_factory=dict)
    paced: dict[str, list[WrkResult]] = field(default_factory=dict)
    paced_target: float = 0.0
    start_s: list[float] = field(default_factory=list)
    wake_s: list[float] = field(default_factory=list)
    load_average: float = field(default_factory=lambda: os.getloadavg()[0])

    def median(self, table: dict[str, list[WrkResult]], name: str, attr: str) -> float:
        return float(statistics.median(float(getattr(result, attr)) for result in table[name]))

    def ratio(self) -> float:
        haproxy = self.median(self.peak, "haproxy", "requests_per_s")
        return self.median(self.peak, "hangar", "requests_per_s") / haproxy if haproxy else 0.0

    def report(self) -> str:
        names = ("direct", "haproxy", "hangar")
        lines = [
            f"proxy bench: nginx in a network namespace; wrk 1 thread, {self.connections} "
            f"connections, {self.seconds:g}s x {self.runs} rounds (medians); "
            f"HAProxy nbthread {self.haproxy_threads}; hangar proxy 1 process (uvloop)",
            f"host: {os.cpu_count()} CPUs, load average {self.load_average:.1f} at the start "
            "(other work on the host moves every figure)",
            "",
            f"{'full load':<12}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}",
        ]
        for name in names:
            lines.append(
                f"{name:<12}{self.median(self.peak, name, 'requests_per_s'):>12.0f}"
                f"{self.median(self.peak, name, 'p50_ms'):>10.3f}"
                f"{self.median(self.peak, name, 'p99_ms'):>10.3f}"
                f"{sum(r.errors for r in self.peak[name]):>8}"
            )
        if self.paced:
            direct_p99 = self.median(self.paced, "direct", "p99_ms")
            lines += [
                "",
                f"at about half of HAProxy's peak ({self.paced_target:.0f} req/s; connections "
                f"paced by wrk's delay(), calibrated per target)",
                f"{'':<12}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'added p99':>11}",
            ]
            for name in names:
                p99 = self.median(self.paced, name, "p99_ms")
                added = "" if name == "direct" else f"{p99 - direct_p99:>11.3f}"
                lines.append(
                    f"{name:<12}{self.median(self.paced, name, 'requests_per_s'):>12.0f}"
                    f"{self.median(self.paced, name, 'p50_ms'):>10.3f}{p99:>10.3f}{added}"
                )
        if self.start_s and self.wake_s:
            start = statistics.median(self.start_s) * 1000
            wake = statistics.median(self.wake_s) * 1000
            lines += [
                "",
                f"autostart: plain start to first byte {start:.1f} ms; request to a stopped "
                f"machine to first byte through hangar {wake:.1f} ms "
                f"(wake/start {wake / start:.2f}; medians of {len(self.wake_s)})",
            ]
        lines += ["", f"ratio hangar/haproxy: {self.ratio():.2f}"]
        return "\n".join(lines)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise HangarError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rate and p50 and p99):
        raise HangarError("cannot read wrk's output", output=output[-2000:])
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    count = int(errors.group(1)) if errors else 0
    if sockets:
        count += sum(int(value) for value in sockets.groups())
    return WrkResult(float(rate.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), count)


def run_wrk(url: str, connections: int, seconds: float, script: Path | None = None) -> WrkResult:
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-H",
        f"Host: {APP}.{DOMAIN}",
    ]
    if script is not None:
        argv += ["-s", str(script)]
    result = subprocess.run(
        [*argv, url], capture_output=True, text=True, timeout=WRK_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise HangarError(f"wrk failed: {result.stderr.strip()}", argv=argv)
    return parse_wrk(result.stdout)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _first_byte(host: str, port: int, deadline: float) -> float:
    """Poll until ``GET /`` answers; returns the time its first byte came."""
    import socket

    request = f"GET / HTTP/1.1\r\nHost: {APP}.{DOMAIN}\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as sock:
                sock.sendall(request)
                if sock.recv(1):
                    return time.monotonic()
        except OSError:
            time.sleep(0.001)
    raise HangarError(f"{host}:{port} did not answer in {READY_TIMEOUT_S:g}s")


@contextlib.contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def nginx_command(link: NamespaceLink, scratch: Path) -> list[str]:
    conf = scratch / "nginx.conf"
    if not conf.exists():
        conf.write_text(NGINX_CONF.format(dir=scratch, ip=link.guest_ip, port=BACKEND_PORT))
    return link.command("nginx", "-c", str(conf), "-p", str(scratch))


def backends_file(link: NamespaceLink, path: Path, state: str) -> None:
    service = {
        "protocol": "tcp",
        "internal_port": BACKEND_PORT,
        "autostart": True,
        "ports": [{"port": 80, "handlers": ["http"]}],
        "concurrency": {"type": "requests", "soft_limit": 10000, "hard_limit": 20000},
    }
    machine = {
        "id": "bench-1",
        "app": APP,
        "state": state,
        "private_ip": link.guest_ip,
        "config": {"services": [service]},
    }
    path.write_text(json.dumps([machine]))


def _wait_listening(stream_log: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        found = listening_port(stream_log.read_text(errors="replace"), 80)
        if found is not None:
            return found
        if process.poll() is not None:
            raise HangarError(f"process exited: {stream_log.read_text()[-2000:]}")
        time.sleep(0.02)
    raise HangarError("hangar proxy did not start listening in time")


def _plain_start(link: NamespaceLink, scratch: Path) -> float:
    began = time.monotonic()
    with _process(nginx_command(link, scratch), scratch / "nginx-start.log"):
        return _first_byte(link.guest_ip, BACKEND_PORT, began + READY_TIMEOUT_S) - began


async def _wake_once(link: NamespaceLink, scratch: Path, path: Path) -> float:
    from hangar.proxy.command_backends import CommandBackends
    from hangar.proxy.proxy import Proxy
    from hangar.proxy.scaler import port_accepts
    from hangar.proxy.settings import ProxySettings
    from hangar.proxy.static import load_backends_file

    if await port_accepts(link.guest_ip, BACKEND_PORT, 1.0):
        raise HangarError("the backend still listens before a wake: a stop did not finish")
    backends = CommandBackends(load_backends_file(path), {"bench-1": nginx_command(link, scratch)})
    settings = ProxySettings(
        domain=DOMAIN, bind_host="127.0.0.1", port_map={80: 0}, probe_interval_s=0.001
    )
    proxy = Proxy(backends, settings)
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.host_port(80))
        began = time.monotonic()
        writer.write(
            f"GET / HTTP/1.1\r\nHost: {APP}.{DOMAIN}\r\nConnection: close\r\n\r\n".encode()
        )
        async with asyncio.timeout(READY_TIMEOUT_S):
            first = await reader.read(1)
            elapsed = time.monotonic() - began
            rest = await reader.read()
        writer.close()
        if not (first + rest).startswith(b"HTTP/1.1 200"):
            raise HangarError(f"wake answered {(first + rest)[:200]!r}")
        return elapsed
    finally:
        await proxy.close()
        await backends.close()


def measure_wake(link: NamespaceLink, scratch: Path, runs: int) -> tuple[list[float], list[float]]:
    """(plain start times, wake-through-the-proxy times) in seconds, taken in turn."""
    path = scratch / "wake.json"
    backends_file(link, path, "stopped")
    starts: list[float] = []
    wakes: list[float] = []
    for _ in range(runs):
        starts.append(_plain_start(link, scratch))
        wakes.append(uvloop.run(_wake_once(link, scratch, path)))  # as hangar proxy runs
    return starts, wakes


def run_proxy_bench(
    connections: int = 32,
    seconds: float = 5.0,
    runs: int = 3,
    haproxy_threads: int = 1,
    wake_runs: int = 9,
) -> ProxyBenchResult:
    for tool in ("wrk", "haproxy", "nginx", "ip"):
        if shutil.which(tool) is None:
            raise HangarError(f"{tool} is not installed (make deps installs it)", tool=tool)
    result = ProxyBenchResult(connections, seconds, runs, haproxy_threads)
    with (
        tempfile.TemporaryDirectory(prefix="hangar-bench-proxy-") as name,
        veth_namespace() as link,
    ):
        scratch = Path(name)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (scratch / sub).mkdir()
        haproxy_port = _free_port()
        (scratch / "haproxy.cfg").write_text(
            HAPROXY_CONF.format(
                threads=haproxy_threads,
                port=haproxy_port,
                ip=link.guest_ip,
                backend_port=BACKEND_PORT,
            )
        )
        path = scratch / "backends.json"
        backends_file(link, path, "started")
        hangar_log = scratch / "hangar-proxy.log"
        hangar_argv = proxy_command(path, DOMAIN, "127.0.0.1", {80: 0})
        with (
            _process(nginx_command(link, scratch), scratch / "nginx.log"),
            _process(
                ["haproxy", "-db", "-f", str(scratch / "haproxy.cfg")], scratch / "haproxy.log"
            ),
            _process(hangar_argv, hangar_log) as hangar,
        ):
            hangar_port = _wait_listening(hangar_log, hangar)
            deadline = time.monotonic() + READY_TIMEOUT_S
            urls = {
                "direct": f"http://{link.guest_ip}:{BACKEND_PORT}/",
                "haproxy": f"http://127.0.0.1:{haproxy_port}/",
                "hangar": f"http://127.0.0.1:{hangar_port}/",
            }
            _first_byte(link.guest_ip, BACKEND_PORT, deadline)
            _first_byte("127.0.0.1", haproxy_port, deadline)
            _first_byte("127.0.0.1", hangar_port, deadline)
            for url in urls.values():
                run_wrk(url, connections, 1.0)  # warm up
            for _ in range(runs):
                for label, url in urls.items():
                    result.peak.setdefault(label, []).append(run_wrk(url, connections, seconds))
            haproxy_peak = result.median(result.peak, "haproxy", "requests_per_s")
            result.paced_target = haproxy_peak / 2
            script = scratch / "paced.lua"
            script.write_text(PACED_SCRIPT.format(delay_ms=PACE_DELAY_MS))
            paced = {
                label: _calibrate(url, result.paced_target, script) for label, url in urls.items()
            }
            for _ in range(runs):
                for label, url in urls.items():
                    result.paced.setdefault(label, []).append(
                        run_wrk(url, paced[label], seconds, script)
                    )
        result.start_s, result.wake_s = measure_wake(link, scratch, wake_runs)
    return result


def _calibrate(url: str, target: float, script: Path) -> int:
    """Connections that, each waiting ``PACE_DELAY_MS`` between requests, make about
    ``target`` requests/s through ``url`` (a few short runs, scaled each time)."""
    connections = max(1, math.ceil(target / (1000.0 / (PACE_DELAY_MS + UNLOADED_LATENCY_MS))))
    for _ in range(CALIBRATION_ROUNDS):
        got = run_wrk(url, connections, CALIBRATION_SECONDS, script).requests_per_s
        if got > 0 and abs(got - target) <= 0.05 * target:
            break
        scaled = round(connections * target / max(got, 1.0))
        connections = max(1, min(MAX_PACED_CONNECTIONS, scaled))
    return connections
