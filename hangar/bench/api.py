"""``hangar bench api``: what a machine create, get and list cost through the API as the
fleet grows, at several fleet sizes in one run (100, 1,000 and 10,000 machines by default).

The server is the real one (``build_server``: app, agent, stores on SQLite), called in
process through ``httpx.ASGITransport`` on one event loop, without a private network or a
proxy (so the bench needs no privileges and touches no host network). Between sizes the
fleet is filled in the store directly, through ``MachineStore.insert_machine`` (the write
the API's create makes, usage counters included): filling 10,000 machines through the API
would time the filling, not the fleet. The timed calls go through the API: creates with
``skip_launch`` (the agent still prepares the machine: the bench waits for it between
samples, untimed, so that no sample pays for the one before), gets of a machine, the whole
list of the app (``GET .../machines``) and its first page (``?limit=``). A few untimed
calls of each kind warm the process up first (they count in the fleet).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx

from hangar.clock import SystemClock
from hangar.images.build import build_busybox_image
from hangar.model.config import MachineConfig
from hangar.model.host import HostInfo
from hangar.model.machine import Machine, MachineState, new_machine_id, new_ulid
from hangar.ratelimit import RateLimits
from hangar.server import EmbeddedServer, build_server
from hangar.settings import Settings

DEFAULT_SIZES = (100, 1_000, 10_000)
MAX_SIZE = 100_000
ORG = "bench"
APP = "bench"
PAGE = 100
WARMUP = 5
IDLE_TIMEOUT_S = 60.0
OPERATIONS = ("create", "get", "list", "page")
UNLIMITED = RateLimits.parse("default=100000/100000,get_machine=100000/100000")


def parse_sizes(text: str) -> tuple[int, ...]:
    """``100,1000,10000``: fleet sizes, each 1..100,000, strictly growing."""
    try:
        sizes = tuple(int(part.replace("_", "")) for part in text.split(","))
    except ValueError:
        raise ValueError(f"sizes: {text!r} is not a comma-separated list of integers") from None
    if any(size < 1 or size > MAX_SIZE for size in sizes):
        raise ValueError(f"sizes: each size is 1 to {MAX_SIZE}")
    if any(later <= earlier for earlier, later in itertools.pairwise(sizes)):
        raise ValueError("sizes: each size must be larger than the one before")
    return sizes


def p50_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000.0


@dataclass
class ApiBenchResult:
    samples: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    """fleet size -> operation (create, get, list, page) -> seconds of each call"""
    cpu: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    """the same, in CPU seconds of the thread that served the call (what other processes on
    a busy machine do not change)"""
    fill_s: float = 0.0

    def ratio(self, operation: str, cpu: bool = False) -> float:
        table = self.cpu if cpu else self.samples
        sizes = sorted(table)
        return p50_ms(table[sizes[-1]][operation]) / p50_ms(table[sizes[0]][operation])

    @staticmethod
    def _table(title: str, table: dict[int, dict[str, list[float]]]) -> list[str]:
        header = f"{title:<10}" + "".join(
            f" {name + ' p50':>13}" for name in ("create", "get", "list all", f"list {PAGE}")
        )
        lines = [header]
        for size in sorted(table):
            row = table[size]
            lines.append(
                f"{size:>10}"
                + "".join(f" {p50_ms(row[name]):>10.2f} ms" for name in OPERATIONS)
                + f"  ({len(row['create'])} creates, {len(row['list'])} lists)"
            )
        return lines

    def report(self) -> str:
        sizes = sorted(self.samples)
        lines = self._table("machines", self.samples)
        if self.cpu:
            lines += self._table("cpu", self.cpu)
        lines.append(f"filled {sizes[-1]} machines in the store in {self.fill_s:.1f}s")
        first, last = sizes[0], sizes[-1]
        for name, operation in (("get", "get"), (f"list {PAGE}", "page")):
            lines.append(f"ratio {name} {last}/{first}: {self.ratio(operation):.2f}")
        if self.cpu:
            lines.append(f"ratio create cpu {last}/{first}: {self.ratio('create', cpu=True):.2f}")
        lines.append(f"ratio create {last}/{first}: {self.ratio('create'):.2f}")
        return "\n".join(lines)


@dataclass
class _Row:
    wall: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in OPERATIONS})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in OPERATIONS})

    async def timed(
        self, operation: str, call: Callable[[], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        started, started_cpu = time.perf_counter(), time.thread_time()
        response = await call()
        self.cpu[operation].append(time.thread_time() - started_cpu)
        self.wall[operation].append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"{operation}: {response.status_code} {response.text}")
        return response


def filler(index: int, image: str, host: HostInfo, now: float) -> Machine:
    """A machine as the API would have created it on ``host`` with ``skip_launch``."""
    machine_id = new_machine_id()
    return Machine(
        id=machine_id,
        name=f"fill-{index}",
        app=APP,
        state=MachineState.CREATED,
        region=host.region,
        instance_id=new_ulid(now),
        version=1,
        config=MachineConfig(image=image),
        created_at=now,
        updated_at=now,
        host_id=host.id,
    )


async def _idle(server: EmbeddedServer) -> None:
    """Until the agent has nothing queued or running (its prepare of the last create)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while server.agent.runs.list_runs(unfinished_only=True):
        if time.monotonic() > deadline:
            raise RuntimeError("the agent did not finish preparing the bench's machines")
        await asyncio.sleep(0.002)


async def _measure_size(
    api: httpx.AsyncClient, server: EmbeddedServer, image: str, samples: int
) -> _Row:
    row = _Row()
    path = f"/v1/apps/{APP}/machines"
    created: list[str] = []
    body = {"config": {"image": image}, "skip_launch": True}
    for _ in range(samples):
        response = await row.timed("create", partial(api.post, path, json=body))
        created.append(response.json()["id"])
        await _idle(server)
    for machine_id in created:
        await row.timed("get", partial(api.get, f"{path}/{machine_id}"))
    for _ in range(max(3, samples // 5)):
        await row.timed("list", partial(api.get, path))
    for _ in range(samples):
        await row.timed("page", partial(api.get, path, params={"limit": PAGE}))
    return row


async def _bench(
    server: EmbeddedServer, token: str, image: str, sizes: Sequence[int], samples: int
) -> ApiBenchResult:
    result = ApiBenchResult()
    clock = SystemClock()
    transport = httpx.ASGITransport(app=server.app)
    headers = {"Authorization": f"Bearer {token}"}
    app = server.app
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as api,
    ):
        for method, url, body in (
            ("POST", "/v1/orgs", {"slug": ORG}),
            ("POST", "/v1/apps", {"app_name": APP, "org_slug": ORG}),
            # Quotas the fleet stays within, so that every create is checked against them.
            ("PUT", f"/v1/orgs/{ORG}/quotas", {"machines": MAX_SIZE * 2, "memory_mb": 1 << 40}),
        ):
            response = await api.request(method, url, json=body)
            if response.status_code not in (200, 201):
                raise RuntimeError(f"setup: {response.status_code} {response.text}")
        # Untimed: the first calls of a fresh process pay for what later ones find ready.
        warmup = await _measure_size(api, server, image, WARMUP)
        have = len(warmup.wall["create"])
        store = server.stores.machines
        for size in sizes:
            started = time.perf_counter()
            for index in range(have, size):
                store.insert_machine(filler(index, image, server.host, clock.now()))
            result.fill_s += time.perf_counter() - started
            row = await _measure_size(api, server, image, samples)
            result.samples[size], result.cpu[size] = row.wall, row.cpu
            have = size + samples
    return result


def run_api_bench(
    sizes: Sequence[int] = DEFAULT_SIZES, samples: int = 25, scratch: Path | None = None
) -> ApiBenchResult:
    with tempfile.TemporaryDirectory(prefix="hangar-bench-api-", dir=scratch) as folder:
        layout = Path(folder) / "image"
        build_busybox_image(layout, "bench", ["sh"], {})
        image = f"oci:{layout}:bench"
        settings = Settings(
            home=Path(folder) / "home", net=False, proxy=False, oci_dirs=(Path(folder),)
        )

        async def main() -> ApiBenchResult:
            server = build_server(settings, rate_limits=UNLIMITED)
            try:
                _token, secret = server.tokens.issue_operator("bench api")
                return await _bench(server, secret, image, sizes, samples)
            finally:
                server.stores.close()

        return asyncio.run(main())
