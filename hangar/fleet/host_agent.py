"""``hangar agent --etcd``: one host of a fleet (Fly's flyd).

The agent is the one ``hangar server`` runs (same durable runs, steps, reconciliation, GPU
handoff, health checks and proxy), with the fleet's shared records on etcd and its own durable
state in its own SQLite (runs, VM handles, GPU inventory, usage): the source of truth for what
runs on this host. In order, at start:

1. runs addressed to this host while it was away are recorded in its run store (so that
   reconciliation sees them: a claim the API took for a machine whose run is waiting is kept);
2. the agent starts: its host's capacity and GPUs go into its claim record (claims and GPU
   states it had are kept), then it reconciles (its SQLite wins for its own machines: VMMs no
   record owns are killed, claims no live machine holds are released, runs resume);
3. the host registers under a lease (``HostLease``) with its inventory, pool and free capacity;
   API replicas place on it only while that lease lives;
4. it watches etcd for runs addressed to it (``WorkIntake``) and publishes its runs
   (``BoardPublisher``); machine records it changes are etcd's at once;
5. with a private network and an underlay address (``HANGAR_NET_UNDERLAY``), it keeps the
   routes and rules to the machines on the other hosts current (``FleetNetwork``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

from hangar.agent.agent import Agent
from hangar.agent.engine import crash_after
from hangar.agent.gpus import HostGpus
from hangar.agent.host import HostServices
from hangar.agent.metering import UsageMeter
from hangar.agent.network import MachineNetwork
from hangar.agent.placement import HostPlacement
from hangar.agent.platform import GuestPlatform
from hangar.agent.volumes import HostVolumes
from hangar.clock import Clock, SystemClock
from hangar.errors import StoreError
from hangar.fleet.board import BoardPublisher
from hangar.fleet.network import FleetNetwork
from hangar.fleet.relay import RelayServer, build_relay_server
from hangar.fleet.stores import FleetStores, open_fleet_stores
from hangar.fleet.usage import UsagePublisher
from hangar.fleet.work import WorkIntake, decode_run
from hangar.metrics import HangarMetrics
from hangar.model.host import HostInfo, read_local_host
from hangar.model.run import RunRecord
from hangar.net.host import HostNetConfig, HostNetwork
from hangar.server import MachineTraffic, make_private_dir, overcommit_of
from hangar.settings import Settings
from hangar.store.embedded import EmbeddedStores, open_embedded_stores
from hangar.store.etcd.hosts import HostLease, HostRecord
from hangar.store.protocol import AuditRecord
from hangar.volumes import VolumeHost, VolumeSettings

log = logging.getLogger(__name__)


class MemberAgent(Agent):
    """The agent of one fleet host: a run of one of its machines runs here; a run of another
    host's machine (its proxy waking one it forwards to) is addressed to that host's agent."""

    def __init__(self, fleet: FleetStores, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fleet = fleet

    def _elsewhere(self, subject: str) -> str | None:
        """The host of ``subject`` (a machine or a volume) when it is another one (None: this
        host's, or no record: a GPU's run)."""
        host_id = self._fleet.host_of(subject)
        return None if host_id is None or host_id == self.host.placement.host.id else host_id

    def submit(self, run: RunRecord) -> bool:
        host_id = self._elsewhere(run.machine_id)
        if host_id is None:
            return super().submit(run)
        return self._fleet.work.submit(host_id, run)

    def has_unfinished_run(self, machine_id: str) -> bool:
        host_id = self._elsewhere(machine_id)
        if host_id is None:
            return super().has_unfinished_run(machine_id)
        return self._fleet.run_unfinished(host_id, machine_id)


@dataclass
class HostAgent:
    settings: Settings
    host: HostInfo
    pool: str
    fleet: FleetStores
    local: EmbeddedStores
    agent: Agent
    traffic: MachineTraffic
    publisher: BoardPublisher
    lease: HostLease | None = None
    intake: WorkIntake | None = None
    fleet_network: FleetNetwork | None = None
    relay: RelayServer | None = None
    usage: UsagePublisher | None = None

    def belongs_here(self, run: RunRecord) -> bool:
        """``run``'s machine (or volume) is on this host."""
        return self.fleet.host_of(run.machine_id) == self.host.id

    def take_waiting(self) -> int:
        """Record every run waiting for this host (step 1); how many there were."""
        prefix = self.fleet.work.host_prefix(self.host.id)
        count = 0
        for kv in self.fleet.client.range_prefix(prefix).kvs:
            run = decode_run(kv)
            if self.belongs_here(run):
                self.local.runs.insert_run(run)
            self.fleet.work.taken(kv)
            count += 1
        return count

    def record(self) -> HostRecord:
        """This host as it registers: inventory, pool, zone and what is free now."""
        state = self.agent.host.placement.current().state
        free_gpus = len(state.whole_free_indexes())
        net_host_number, underlay = self.network_record()
        return HostRecord(
            host=self.host,
            gpus=self.local.gpus.list_gpus(host_id=self.host.id),
            started_at=self.agent.clock.now(),
            zone=self.settings.zone,
            pool=self.pool,
            free_cpu_milli=state.cpu_milli - sum(claim.cpu_milli for claim in state.claims),
            free_memory_mb=state.memory_mb - sum(claim.memory_mb for claim in state.claims),
            free_gpus=free_gpus,
            net_host_number=net_host_number,
            underlay=underlay,
            address=self.relay.url if self.relay is not None else "",
        )

    def network_record(self) -> tuple[int | None, str]:
        """What the fleet needs of this host's private network: its number in addresses and
        the underlay address the other hosts route its prefixes to."""
        network = self.agent.host.network
        if network is None:
            return None, ""
        underlay = network.net.config.underlay
        return network.host_number, str(underlay) if underlay is not None else ""

    def _accept(self, run: RunRecord) -> None:
        self.agent.submit(run)
        self.publisher.mark(run.machine_id)

    async def start(self) -> None:
        waiting = await asyncio.to_thread(self.take_waiting)
        if waiting:
            log.info("recorded %d run(s) addressed to this host while it was away", waiting)
        await self.traffic.start()
        self.publisher.start()
        if self.usage is not None:
            self.usage.start()
        for machine in await asyncio.to_thread(self.fleet.machines.list_machines, None):
            if machine.host_id == self.host.id:
                self.publisher.mark(machine.id)  # the board as this host's SQLite has it
        if self.relay is not None:
            await self.relay.start()
        self.lease = HostLease(
            self.fleet.client,
            await asyncio.to_thread(self.record),
            self.fleet.layout,
            ttl_s=self.settings.host_lease_ttl_s,
        )
        await asyncio.to_thread(self.lease.start)
        self.intake = WorkIntake(
            self.fleet.client,
            self.fleet.work,
            self.host.id,
            self.belongs_here,
            self._accept,
            asyncio.get_running_loop(),
        )
        await asyncio.to_thread(self.intake.start)
        network = self.agent.host.network
        if network is not None and network.net.config.underlay is not None:
            self.fleet_network = FleetNetwork(self.fleet, self.host.id, network, self.agent.notify)
            await self.fleet_network.start()
        log.info("host %s (pool %s) registered in the fleet", self.host.id, self.pool)

    async def publish_capacity(self) -> None:
        """Refresh the registration when what is free changed (every third of the TTL)."""
        interval = self.settings.host_lease_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            if self.lease is None:
                continue
            try:
                record = await asyncio.to_thread(self.record)
                published = self.lease.record
                if record.model_copy(update={"started_at": published.started_at}) != published:
                    await asyncio.to_thread(self.lease.update, record)
            except StoreError as error:
                log.warning("capacity not published: %s", error)

    async def close(self) -> None:
        if self.fleet_network is not None:
            await self.fleet_network.close()
        if self.intake is not None:
            await asyncio.to_thread(self.intake.close)
        if self.lease is not None:
            await asyncio.to_thread(self.lease.stop)
        if self.relay is not None:
            await self.relay.close()
        await self.traffic.close()
        await asyncio.to_thread(self.publisher.flush, 5.0)
        self.publisher.close()
        if self.usage is not None:
            await asyncio.to_thread(self.usage.close)
        self.fleet.close()
        self.local.close()


def audit_repair(
    fleet: FleetStores, host: HostInfo, clock: Clock, action: str, machine_id: str
) -> None:
    """What reconciliation repaired, in the fleet's audit log (the machine's org's, when the
    machine is still known), done by ``agent:HOST``."""
    machine = fleet.machines.get_machine(machine_id)
    app = fleet.machines.get_app(machine.app) if machine is not None else None
    fleet.tenancy.add_audit(
        AuditRecord(
            timestamp=clock.now(),
            token_id=f"agent:{host.id}",
            org_slug=app.org_slug if app is not None else "",
            action=f"reconcile_{action}",
            target=f"host/{host.id}",
            app_name=machine.app if machine is not None else "",
            machine_id=machine_id,
            outcome="ok",
            status=200,
        )
    )


def build_host_agent(
    settings: Settings, platform: GuestPlatform | None = None, clock: Clock | None = None
) -> HostAgent:
    clock = clock or SystemClock()
    for private in (settings.home, settings.machines_dir, settings.cache_dir):
        make_private_dir(private)
    fleet = open_fleet_stores(settings, tokens=False)
    local = open_embedded_stores(settings.database)
    metrics = HangarMetrics(clock)
    if platform is None:
        from hangar.agent.guest import QemuGuestPlatform

        platform = QemuGuestPlatform.from_settings(settings, image_observer=metrics)
    host = read_local_host(settings.host_id, settings.region)
    gpus = HostGpus.from_settings(settings)
    pool = settings.pool or ("gpu" if gpus.inventory().gpus else "general")
    network = None
    if settings.net:
        network = MachineNetwork(HostNetwork(HostNetConfig.from_settings(settings)), clock)
        if network.net.config.underlay is None:
            log.warning(
                "no underlay address (HANGAR_NET_UNDERLAY): machines on %s reach only the "
                "machines of their org on this host",
                host.id,
            )
    services_of_host = HostServices(
        platform=platform,
        machines_dir=settings.machines_dir,
        placement=HostPlacement(
            fleet.claims,
            host,
            observer=metrics,
            overcommit=overcommit_of(settings),
            allow_cpu_machines=pool != "gpu",
        ),
        gpu_store=local.gpus,
        gpus=gpus,
        network=network,
        volumes=HostVolumes(
            VolumeHost(VolumeSettings.from_settings(settings), clock=clock), fleet.volumes, host.id
        ),
        secrets=fleet.secrets,
    )
    if fleet.secrets is None:
        log.warning(
            "no fleet key (HANGAR_ETCD_KEY_FILE): machines on %s boot without their apps' secrets",
            host.id,
        )
    publisher = BoardPublisher(fleet.board, local.runs, host.id)
    meter = UsageMeter(
        local.usage,
        fleet.machines,
        local.runs,
        services_of_host,
        clock,
        checkpoint_s=settings.usage_checkpoint_s,
    )
    agent = MemberAgent(
        fleet,
        fleet.machines,
        local.runs,
        services_of_host,
        clock,
        crash_after(settings.crash_after_step, settings.crash_after_step_file),
        meter=meter,
        observers=(metrics, publisher),
        on_repair=lambda action, machine_id: audit_repair(fleet, host, clock, action, machine_id),
    )
    spans_fleet = network is not None and network.net.config.underlay is not None
    traffic = MachineTraffic.for_agent(agent, settings, clock, proxy_everywhere=spans_fleet)
    relay = build_relay_server(settings, fleet, local, agent, host, metrics)
    usage = UsagePublisher(fleet.usage, local.usage, host.id, clock, settings.usage_checkpoint_s)
    return HostAgent(
        settings, host, pool, fleet, local, agent, traffic, publisher, relay=relay, usage=usage
    )


def run_host_agent(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT; then unregister (the lease is revoked) and stop."""

    async def main() -> None:
        host_agent = await asyncio.to_thread(build_host_agent, settings)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await host_agent.start()
        capacity = asyncio.create_task(host_agent.publish_capacity())
        try:
            await stopping.wait()
        finally:
            capacity.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await capacity
            await host_agent.close()

    asyncio.run(main())
