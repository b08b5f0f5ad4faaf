"""``hangar bench tenancy``: one tenant floods, another's machines are timed.

A real ``hangar server`` on loopback. Tenant *measured* runs a loop: create a machine (a
local image, cached), wait until it is started and its init says ready, stop it, wait until
it is stopped, destroy it. The loop runs first alone (the baseline), then while tenant
*flood* (and a client with no token) does what the issue's findings did:

- machines on a registry that drips its answer forever (a tarpit on loopback, which the
  bench allows as a local registry), holding image threads;
- a chatty machine writing its console and control port as fast as it can, with log
  followers on it;
- anonymous requests with long paths, as fast as one client sends them.

Everything is bounded in count and time and stays on loopback. The report gives each
phase's p50 and p99 and ``ratio flood/baseline p99`` on a line of its own (the target: 2 or
less).
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hangar.model.guest_contract import Port, RunDir
from hangar.server_process import BearerToken, ServerProcess
from hangar.settings import env_name

READY_LINE = b"hangar-init: ready"
SLEEPER = ["sh", "-c", "sleep 3600"]
CHATTY = [
    "sh",
    "-c",
    "for p in /sys/class/virtio-ports/*; do "
    f'[ "$(cat $p/name)" = {Port.CONTROL} ] && dev=$(cat $p/dev); done; '
    "mknod /tmp/ctl c ${dev%:*} ${dev#*:}; "
    '(while :; do echo \'{"type":"noise","pad":"xxxxxxxxxxxxxxxxxxxxxxxx"}\'; done > /tmp/ctl) & '
    "while :; do echo chatty console line padding padding padding padding; done",
]
TIMEOUT_S = 180.0
POLL_S = 0.05
TARPIT_MACHINES = 6
FOLLOWERS = 8
ANONYMOUS_CLIENTS = 2
ANONYMOUS_MAX_REQUESTS = 50_000
LONG_PATH = "x" * 8000


@dataclass
class TenancyBenchResult:
    baseline_s: list[float] = field(default_factory=list)
    flood_s: list[float] = field(default_factory=list)
    flood_counts: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def p99(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]

    def ratio(self) -> float:
        return self.p99(self.flood_s) / self.p99(self.baseline_s)

    def report(self) -> str:
        lines = ["tenant B's create-start-stop cycle (create -> ready, stop -> stopped):"]
        for name, values in (("baseline", self.baseline_s), ("flood", self.flood_s)):
            lines.append(
                f"  {name:9} n={len(values)} p50={statistics.median(values):.2f}s "
                f"p99={self.p99(values):.2f}s"
            )
        counts = ", ".join(f"{key}={value}" for key, value in sorted(self.flood_counts.items()))
        lines.append(f"  flood: {counts}")
        lines.append(f"ratio flood/baseline p99: {self.ratio():.2f}")
        return "\n".join(lines)


@contextmanager
def tarpit() -> Iterator[str]:
    """A "registry" on loopback that answers one byte every half second, forever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()

    def drip(connection: socket.socket) -> None:
        with connection:
            for byte in b"HTTP/1.1 200 OK\r\nX-Drip: " + b"x" * 100_000:
                if stop.wait(0.5):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=drip, args=(connection,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: {what} did not happen within {TIMEOUT_S:g}s")
        time.sleep(POLL_S)


def _state(api: httpx.Client, path: str) -> str:
    state: str = api.get(path).json()["state"]
    return state


def _ready(console: Path) -> bool:
    try:
        return READY_LINE in console.read_bytes()[-65536:]
    except FileNotFoundError:
        return False


def cycle(api: httpx.Client, home: Path, app: str, image: str) -> float:
    """Create -> started and ready, stop -> stopped (timed), then destroy (not timed)."""
    config = {"image": image, "init": {"cmd": SLEEPER}, "restart": {"policy": "no"}}
    config["stop_config"] = {"timeout": "2s"}
    started = time.monotonic()
    created = api.post(f"/v1/apps/{app}/machines", json={"config": config})
    created.raise_for_status()
    machine_id = created.json()["id"]
    path = f"/v1/apps/{app}/machines/{machine_id}"
    console = home / "machines" / machine_id / RunDir.CONSOLE_LOG
    _wait(lambda: _state(api, path) == "started" and _ready(console), "started and ready")
    api.post(f"{path}/stop").raise_for_status()
    _wait(lambda: _state(api, path) == "stopped", "stopped")
    elapsed = time.monotonic() - started
    api.delete(path, params={"force": "true"}).raise_for_status()
    _wait(lambda: _state(api, path) == "destroyed", "destroyed")
    return elapsed


class Flood:
    """Tenant A's flood and an anonymous client's, started and stopped together."""

    def __init__(self, server: ServerProcess, token: str, app: str, image: str, tarpit: str):
        self.server, self.token, self.app = server, token, app
        self.image, self.tarpit = image, tarpit
        self.stop = threading.Event()
        self.counts: dict[str, int] = {"anonymous": 0, "followed_bytes": 0, "tarpit_creates": 0}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + amount

    def _client(self, anonymous: bool = False) -> httpx.Client:
        auth = None if anonymous else BearerToken(self.token)
        return httpx.Client(base_url=self.server.url, auth=auth, timeout=30.0)

    def start(self) -> None:
        with self._client() as api:
            # The chatty machine first: the tarpit pulls then hold this tenant's image threads.
            chatty = {"image": self.image, "init": {"cmd": CHATTY}, "restart": {"policy": "no"}}
            created = api.post(f"/v1/apps/{self.app}/machines", json={"config": chatty})
            created.raise_for_status()
            self.chatty = created.json()["id"]
            path = f"/v1/apps/{self.app}/machines/{self.chatty}"
            _wait(lambda: _state(api, path) == "started", "the chatty machine started")
            for _ in range(TARPIT_MACHINES):
                config = {"image": f"{self.tarpit}/flood/app:latest"}
                api.post(f"/v1/apps/{self.app}/machines", json={"config": config})
                self._count("tarpit_creates")
        for _ in range(FOLLOWERS):
            self._spawn(self._follow)
        for _ in range(ANONYMOUS_CLIENTS):
            self._spawn(self._anonymous)

    def _spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _follow(self) -> None:
        path = f"/v1/apps/{self.app}/machines/{self.chatty}/logs"
        while not self.stop.is_set():
            try:
                with self._client() as api, api.stream("GET", path, params={"follow": "true"}) as r:
                    for chunk in r.iter_bytes():
                        self._count("followed_bytes", len(chunk))
                        if self.stop.is_set():
                            return
            except httpx.HTTPError:
                self.stop.wait(0.5)

    def _anonymous(self) -> None:
        with self._client(anonymous=True) as anonymous:
            while not self.stop.is_set() and self.counts["anonymous"] < ANONYMOUS_MAX_REQUESTS:
                with contextlib.suppress(httpx.HTTPError):
                    anonymous.post(f"/v1/apps/{LONG_PATH}/machines", json={})
                self._count("anonymous")

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(30)
        with self._client() as api:
            for machine in api.get(f"/v1/apps/{self.app}/machines").json():
                api.delete(
                    f"/v1/apps/{self.app}/machines/{machine['id']}", params={"force": "true"}
                )


def run_tenancy_bench(image: str, cycles: int, home: Path) -> TenancyBenchResult:
    result = TenancyBenchResult()
    with tarpit() as registry:
        env = {
            env_name("local_registries"): registry,
            env_name("insecure_registries"): registry,
            env_name("anonymous_rate_limit"): "5/20",
        }
        with ServerProcess(home, env) as server, server.client() as operator:
            tokens = {}
            for org in ("flood", "measured"):
                operator.post("/v1/orgs", json={"slug": org}).raise_for_status()
                created = operator.post("/v1/tokens", json={"org_slug": org})
                created.raise_for_status()
                tokens[org] = created.json()["token"]
                operator.post(
                    "/v1/apps", json={"app_name": f"{org}-app", "org_slug": org}
                ).raise_for_status()
            with server.client(tokens["measured"]) as measured:
                cycle(measured, home, "measured-app", image)  # the image into the cache
                result.baseline_s = [
                    cycle(measured, home, "measured-app", image) for _ in range(cycles)
                ]
                flood = Flood(server, tokens["flood"], "flood-app", image, registry)
                flood.start()
                try:
                    result.flood_s = [
                        cycle(measured, home, "measured-app", image) for _ in range(cycles)
                    ]
                finally:
                    flood.finish()
                result.flood_counts = dict(flood.counts)
    return result
