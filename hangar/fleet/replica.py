"""``hangar api --etcd``: a stateless Machines API replica over the fleet's etcd.

It serves the same FastAPI app and services as ``hangar server`` (the same routers, guard,
tokens, quotas, audit), with the shared stores on etcd and three parts of its own:

- ``FleetPlacer`` picks each new machine's host (and claims there at create);
- ``FleetAgent`` is the agent as the services see it: a submitted run is addressed to the
  machine's host (``WorkQueue``), "busy" and run listings come from what the agents publish
  (``RunBoard``), and ``wait`` wakes on a watch of the machine records. It never runs a step
  and never talks to a VMM: its platform (``NoGuests``) refuses every guest operation, and
  the services hand the guest operations of the API (exec, ps, signal, console, a volume's
  create and delete) to the relay (``HostRelays``), whose host's agent runs them;
- ``FleetHostService`` lists every registered host from the lease registrations.

Replicas share nothing but etcd: run as many as wanted; any of them answers for any machine.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fastapi import FastAPI

from hangar.agent.agent import Agent
from hangar.agent.host import HostServices
from hangar.agent.placement import HostPlacement
from hangar.agent.platform import GuestPlatform
from hangar.api.app import create_app
from hangar.api.services.addresses import PrivateAddresses
from hangar.api.services.hosts import GpuView, HostGpusView, HostService, HostView
from hangar.api.services.orgs import DEFAULT_ORG
from hangar.api.services.tokens import TokenService
from hangar.clock import Clock, SystemClock
from hangar.errors import NotFound, StoreRejected, Unprocessable
from hangar.fleet import admin
from hangar.fleet.admin import FleetHosts
from hangar.fleet.cordons import Cordons
from hangar.fleet.placer import FleetPlacer
from hangar.fleet.relay import HostRelays, RelayCredential
from hangar.fleet.stores import FleetStores, open_fleet_stores
from hangar.metrics import HangarMetrics
from hangar.model.gpu import GpuEvent, GpuState
from hangar.model.host import HostInfo
from hangar.model.run import RunRecord, RunStatus
from hangar.net.addressing import AddressPlan, host_number
from hangar.ratelimit import RateLimits
from hangar.server import ApiStores, build_api, default_org_quotas
from hangar.settings import Settings
from hangar.store.etcd.client import Range
from hangar.store.etcd.hosts import HostMonitor
from hangar.store.etcd.keys import unsegment
from hangar.store.etcd.watch import Watch, WatchEvent
from hangar.store.gpus import SqliteGpuStore
from hangar.store.protocol import MachineStore

log = logging.getLogger(__name__)

ON_HOST = "runs on the machine's host (its agent), not on an API replica"


def _refused(what: str) -> Unprocessable:
    return Unprocessable(f"{what} {ON_HOST}", field="host")


class NoGuests:
    """The guest platform of a process that runs no guest: each operation of
    :class:`GuestPlatform` is refused (``Unprocessable`` naming the host), and each question
    about a guest answers that there is none. Built from the protocol, so an operation added
    there is refused here without a line more."""

    ANSWERS: ClassVar[dict[str, Callable[[], Any]]] = {
        "image_cached": lambda: False,
        "qmp_socket": lambda: None,
        "alive": lambda: False,
        "running": lambda: False,
        "vmm_processes": dict,
    }

    def __getattr__(self, name: str) -> Any:
        member = getattr(GuestPlatform, name, None)
        if name.startswith("_") or not callable(member):
            raise AttributeError(name)
        answer = self.ANSWERS.get(name)

        def call(*_args: object, **_kwargs: object) -> Any:
            if answer is None:
                raise _refused(name)
            return answer()

        if not inspect.iscoroutinefunction(member):
            return call

        async def awaited(*args: object, **kwargs: object) -> Any:
            return call(*args, **kwargs)

        return awaited


class FleetRunStore:
    """The runs of any machine of the fleet, as its host's agent last published them;
    read-only (runs are recorded by the agents)."""

    def __init__(self, fleet: FleetStores, machines: MachineStore) -> None:
        self._fleet = fleet
        self._machines = machines

    def insert_run(self, run: RunRecord) -> bool:
        raise StoreRejected("an API replica records no runs; its agent does", run_id=run.id)

    def save_run(self, run: RunRecord) -> None:
        raise StoreRejected("an API replica records no runs; its agent does", run_id=run.id)

    def list_runs(
        self, machine_id: str | None = None, unfinished_only: bool = False
    ) -> list[RunRecord]:
        machine = self._machines.get_machine(machine_id) if machine_id is not None else None
        if machine is None:
            return []
        entry = self._fleet.board.read(machine.host_id, machine.id)
        runs = entry.runs if entry is not None else []
        return [run for run in runs if not unfinished_only or run.status is RunStatus.RUNNING]

    def put_vm_handle(self, machine_id: str, handle: dict[str, object]) -> None:
        raise StoreRejected("an API replica keeps no VM handles", machine_id=machine_id)

    def get_vm_handle(self, machine_id: str) -> dict[str, object] | None:
        raise _refused(f"machine {machine_id}'s VM")

    def delete_vm_handle(self, machine_id: str) -> None:
        raise StoreRejected("an API replica keeps no VM handles", machine_id=machine_id)

    def list_vm_handles(self) -> dict[str, dict[str, object]]:
        return {}

    def forget_machines(self, machine_ids: list[str]) -> None:
        """Their app was deleted: drop what their agents published about their runs (each
        agent's own finished runs stay in its SQLite)."""
        self._fleet.board.forget(machine_ids)


class FleetAgent(Agent):
    """The agent as an API replica's services see it: runs go to the machine's host."""

    def __init__(
        self, fleet: FleetStores, host: HostServices, clock: Clock, runs: FleetRunStore
    ) -> None:
        super().__init__(fleet.machines, runs, host, clock)
        self._fleet = fleet
        self._watch: Watch | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Wake ``wait`` and every listener whenever a machine record changes."""
        self._loop = asyncio.get_running_loop()
        prefix = self._fleet.layout.records("machines")

        def now() -> int:
            return self._fleet.client.range(Range(prefix, prefix=True, limit=1)).revision + 1

        self._watch = Watch(
            self._fleet.client,
            prefix,
            start_revision=await asyncio.to_thread(now),
            on_events=self._records_changed,
            on_compacted=lambda _oldest: now(),
            name="replica machines",
        )
        self._watch.start()

    async def close(self) -> None:
        if self._watch is not None:
            await asyncio.to_thread(self._watch.stop)

    def _records_changed(self, events: Sequence[WatchEvent]) -> None:
        """Each changed machine record's id (its key's last segment) is notified alone."""
        if self._loop is None or self._loop.is_closed():
            return
        for machine_id in dict.fromkeys(unsegment(e.kv.key.rsplit("/", 1)[-1]) for e in events):
            self._loop.call_soon_threadsafe(self.notify, machine_id)

    def register_host(self) -> None:
        """A replica is no host."""

    async def reconcile(self) -> None:
        """Each agent reconciles its own host."""

    async def check_guests(self) -> None:
        """Each agent watches its own guests."""

    def _host_of(self, subject: str) -> str:
        host_id = self._fleet.host_of(subject)
        if host_id is None:
            raise NotFound(f"{subject} not found on any host", machine_id=subject)
        return host_id

    def submit(self, run: RunRecord) -> bool:
        return self._fleet.work.submit(self._host_of(run.machine_id), run)

    def has_unfinished_run(self, machine_id: str) -> bool:
        host_id = self._fleet.host_of(machine_id)
        return host_id is not None and self._fleet.run_unfinished(host_id, machine_id)


class FleetHostService(HostService):
    """Every host of the fleet, from its agent's registration and its claim record."""

    def __init__(
        self,
        agent: Agent,
        host: HostInfo,
        monitor: HostMonitor,
        fleet: FleetStores,
        relays: HostRelays,
    ):
        super().__init__(agent, host)
        self._monitor = monitor
        self._fleet = fleet
        self._relays = relays

    def list_hosts(self) -> list[HostView]:
        views = []
        for host_id, record in sorted(self._monitor.hosts().items()):
            counts: dict[str, int] = {}
            for gpu in record.gpus:
                counts[gpu.kind] = counts.get(gpu.kind, 0) + 1
            views.append(
                HostView(
                    id=host_id,
                    region=record.host.region,
                    pool=record.pool,
                    cpus=record.host.cpus,
                    memory_mb=record.host.memory_mb,
                    gpus=counts,
                )
            )
        return views

    def gpus(self, host_id: str) -> HostGpusView:
        record = self._monitor.get(host_id)
        claims = self._fleet.claims.read_host(host_id)
        if record is None or claims is None:
            raise NotFound(f"host {host_id} not found or unreachable", field="host_id")
        states = {gpu.bdf: gpu.state for gpu in claims.state.gpus}
        holders = {
            claims.state.gpus[index].bdf: claim.machine_id
            for claim in claims.state.claims
            for index in claim.gpu_indexes
        }
        views = [
            GpuView(
                **gpu.model_dump(),
                state=states.get(gpu.bdf, GpuState.QUARANTINED),
                machine_id=holders.get(gpu.bdf, ""),
            )
            for gpu in record.gpus
        ]
        return HostGpusView(host_id=host_id, inventory=None, gpus=views)

    async def gpu_events(self, host_id: str, bdf: str) -> list[GpuEvent]:
        """The GPU's event log, kept by its host's agent (through the relay)."""
        return await self._relays.gpu_events(host_id, bdf)

    async def release_quarantine(self, host_id: str, bdf: str, actor: str, reason: str) -> GpuView:
        """Released by the GPU's host's agent (through the relay), who did it recorded."""
        return await self._relays.release_quarantine(host_id, bdf, actor, reason)


@dataclass
class Replica:
    settings: Settings
    fleet: FleetStores
    monitor: HostMonitor
    cordons: Cordons
    agent: FleetAgent
    tokens: TokenService
    app: FastAPI
    relays: HostRelays

    async def start(self) -> None:
        await asyncio.to_thread(self.monitor.start)
        await asyncio.to_thread(self.cordons.start)
        await asyncio.to_thread(self.fleet.claims.start)
        await self.agent.start()

    async def close(self) -> None:
        await self.agent.close()
        await self.relays.close()
        self.cordons.close()
        self.monitor.close()
        self.fleet.close()


def fleet_addresses(
    settings: Settings, fleet: FleetStores, monitor: HostMonitor
) -> PrivateAddresses | None:
    """How a replica gives a new machine its ``private_ip``: in the fleet's address plan, with
    the number the placed host registered (or, before it did, the one its id gives, as the
    agent computes it); None with ``HANGAR_NET=0``."""
    if not settings.net:
        return None
    plan = AddressPlan.parse(settings.net_prefix, settings.net_egress_subnet)

    def host_number_of(host_id: str) -> int:
        record = monitor.get(host_id)
        if record is not None and record.net_host_number is not None:
            return record.net_host_number
        return host_number(host_id)

    return PrivateAddresses(fleet.machines, fleet.tenancy, plan, host_number_of)


def build_replica(
    settings: Settings, clock: Clock | None = None, rate_limits: RateLimits | None = None
) -> Replica:
    clock = clock or SystemClock()
    settings.home.mkdir(parents=True, exist_ok=True)
    fleet = open_fleet_stores(settings)
    machines, tenancy = fleet.machines, fleet.tenancy
    tenancy.ensure_org(DEFAULT_ORG, clock.now(), quotas=default_org_quotas(settings))
    monitor = HostMonitor(fleet.client, fleet.layout)
    cordons = Cordons(fleet.client, fleet.layout)
    placer = FleetPlacer(fleet.claims, monitor, cordons.is_cordoned)
    replica_host = HostInfo(
        id=f"api-{settings.host_id}", region=settings.region, cpus=0, memory_mb=0
    )
    host_services = HostServices(
        platform=NoGuests(),
        machines_dir=settings.machines_dir,
        placement=HostPlacement(fleet.claims, replica_host),
        gpu_store=SqliteGpuStore(settings.database),
    )
    runs = FleetRunStore(fleet, machines)
    agent = FleetAgent(fleet, host_services, clock, runs)
    metrics = HangarMetrics(clock)
    assert fleet.sealer is not None  # a replica holds the fleet's key
    relays = HostRelays(
        monitor,
        RelayCredential.of(fleet.sealer, clock),
        placer,
        fleet,
        settings.region,
        settings.max_connections,
    )
    assert fleet.secrets is not None and fleet.llm is not None  # a replica holds the key
    stores = ApiStores(
        machines,
        tenancy,
        fleet.volumes,
        runs,
        fleet.usage,
        fleet.claims,
        fleet.secrets,
        fleet.llm,
    )
    api = build_api(
        settings,
        clock,
        stores,
        agent,
        replica_host,
        metrics,
        rate_limits,
        placer=placer,
        hosts=FleetHostService(agent, replica_host, monitor, fleet, relays),
        addresses=fleet_addresses(settings, fleet, monitor),
        remote=relays,
    )
    replica: Replica

    async def start() -> None:
        await replica.start()

    async def close() -> None:
        await replica.close()

    app = create_app(api.services, api.guard, on_startup=start, on_shutdown=close)
    app.include_router(admin.router)
    app.state.fleet_hosts = FleetHosts(
        cordons, machines, api.services.machines, fleet.claims, clock
    )
    replica = Replica(settings, fleet, monitor, cordons, agent, api.tokens, app, relays)
    return replica


def serve_replica(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from hangar.server import bootstrap_operator_token
    from hangar.web.logs import uvicorn_log_config

    replica = build_replica(settings)
    if bootstrap_operator_token(settings.operator_token_file, replica.tokens) is not None:
        log.info("operator token written to %s", settings.operator_token_file)
    log.info("hangar api: etcd %s, listening on %s:%d", ",".join(settings.etcd), host, port)
    uvicorn.run(
        replica.app, host=host, port=port, log_level="info", log_config=uvicorn_log_config()
    )
