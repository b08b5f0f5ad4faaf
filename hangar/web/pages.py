"""What the dashboard's pages show, read from the stores for one viewer: hosts and their
pools, every GPU with its state, holder and place, free GPUs by kind and region, machines by
state. Operator-only parts are empty for any other token."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from hangar.api.schemas import iso8601
from hangar.model.gpu import GpuRecord, GpuState
from hangar.model.machine import Machine, MachineState
from hangar.scheduler import ClaimStore, VersionedHost
from hangar.store.protocol import GpuStore, MachineStore
from hangar.web.viewer import Viewer

MAX_MACHINES = 500
"""A page lists at most this many machines (the most recently changed)."""
STATE_ORDER = (
    MachineState.STARTED,
    MachineState.STARTING,
    MachineState.STOPPING,
    MachineState.REPLACING,
    MachineState.CREATED,
    MachineState.STOPPED,
    MachineState.FAILED,
    MachineState.LAUNCH_FAILED,
    MachineState.DESTROYING,
)


@dataclass(frozen=True)
class HostRow:
    id: str
    region: str
    pool: str
    cpus: float
    free_cpus: float
    memory_mb: int
    free_memory_mb: int
    gpu_kind: str
    gpus: int
    free_gpus: int
    machines: int


@dataclass(frozen=True)
class GpuRow:
    host: str
    bdf: str
    kind: str
    state: str
    holder: str
    holder_app: str
    numa_node: int | None
    nvlink: str
    iommu_group: int | None
    reason: str


@dataclass(frozen=True)
class PlacementRow:
    region: str
    kind: str
    free: int
    claimed: int
    cleaning: int
    quarantined: int

    @property
    def total(self) -> int:
        return self.free + self.claimed + self.cleaning + self.quarantined


@dataclass(frozen=True)
class MachineRow:
    id: str
    name: str
    app: str
    state: str
    region: str
    image: str
    guest: str
    private_ip: str
    updated: str


@dataclass
class Dashboard:
    viewer: Viewer
    hosts: list[HostRow] = field(default_factory=list)
    gpus: list[GpuRow] = field(default_factory=list)
    placement: list[PlacementRow] = field(default_factory=list)
    machines: list[MachineRow] = field(default_factory=list)
    machine_states: dict[str, int] = field(default_factory=dict)
    gpu_states: dict[str, int] = field(default_factory=dict)


def guest_summary(machine: Machine) -> str:
    guest = machine.config.guest
    text = f"{guest.cpus}x {guest.cpu_kind} · {guest.memory_mb} MB"
    if guest.gpus:
        text += f" · {guest.gpus}x {guest.gpu_kind}"
    return text


class DashboardReader:
    def __init__(self, machines: MachineStore, claims: ClaimStore, gpus: GpuStore) -> None:
        self._machines = machines
        self._claims = claims
        self._gpus = gpus

    def visible_machines(self, viewer: Viewer) -> list[Machine]:
        """The viewer's machines that are not destroyed, most recently changed first."""
        if viewer.operator:
            machines = self._machines.list_machines(None)
        else:
            machines = [
                machine
                for app in sorted(viewer.app_names)
                for machine in self._machines.list_machines(app)
            ]
        allowed = viewer.app_names
        visible = [m for m in machines if m.app in allowed]
        visible.sort(key=lambda m: m.updated_at, reverse=True)
        return visible[:MAX_MACHINES]

    def machine_rows(self, viewer: Viewer) -> tuple[list[MachineRow], dict[str, int]]:
        machines = self.visible_machines(viewer)
        rank = {state: position for position, state in enumerate(STATE_ORDER)}
        machines.sort(key=lambda m: rank.get(m.state, len(rank)))
        counts = Counter(str(m.state) for m in machines)
        rows = [
            MachineRow(
                id=m.id,
                name=m.name,
                app=m.app,
                state=str(m.state),
                region=m.region,
                image=m.config.image,
                guest=guest_summary(m),
                private_ip=m.private_ip,
                updated=iso8601(m.updated_at),
            )
            for m in machines
        ]
        return rows, {str(s): counts[str(s)] for s in STATE_ORDER if counts[str(s)]}

    def dashboard(self, viewer: Viewer) -> Dashboard:
        board = Dashboard(viewer=viewer)
        board.machines, board.machine_states = self.machine_rows(viewer)
        if viewer.org_wide or viewer.operator:
            snapshot = self._claims.snapshot()
            board.placement = placement_rows(snapshot)
            if viewer.operator:
                records = {gpu.bdf: gpu for gpu in self._gpus.list_gpus()}
                board.hosts = host_rows(snapshot)
                board.gpus = self.gpu_rows(snapshot, records)
                board.gpu_states = dict(Counter(row.state for row in board.gpus))
        return board

    def gpu_rows(
        self, snapshot: Mapping[str, VersionedHost], records: Mapping[str, GpuRecord]
    ) -> list[GpuRow]:
        rows = []
        for record in sorted(snapshot.values(), key=lambda r: r.state.id):
            host = record.state
            holders = {
                index: claim.machine_id for claim in host.claims for index in claim.gpu_indexes
            }
            for gpu in host.gpus:
                known = records.get(gpu.bdf)
                holder = holders.get(gpu.index, "")
                machine = self._machines.get_machine(holder) if holder else None
                nvlink = known.nvlink_domain if known is not None else None
                if not nvlink and gpu.nvlink_partition is not None:
                    nvlink = f"partition {gpu.nvlink_partition}"
                reason = ""
                if known is not None:
                    reason = known.quarantine_reason or ("" if known.available else known.reason)
                rows.append(
                    GpuRow(
                        host=host.id,
                        bdf=gpu.bdf,
                        kind=gpu.kind,
                        state=str(gpu.state),
                        holder=holder,
                        holder_app=machine.app if machine is not None else "",
                        numa_node=gpu.numa_node,
                        nvlink=nvlink or "",
                        iommu_group=known.iommu_group if known is not None else None,
                        reason=reason,
                    )
                )
        return rows


def host_rows(snapshot: Mapping[str, VersionedHost]) -> list[HostRow]:
    rows = []
    for record in sorted(snapshot.values(), key=lambda r: r.state.id):
        host = record.state
        free_gpus = len(host.whole_free_indexes())
        rows.append(
            HostRow(
                id=host.id,
                region=host.region,
                pool=str(host.pool),
                cpus=host.cpu_milli / 1000,
                free_cpus=host.free_cpu_milli / 1000,
                memory_mb=host.memory_mb,
                free_memory_mb=host.free_memory_mb,
                gpu_kind=host.gpus[0].kind if host.gpus else "",
                gpus=len(host.gpus),
                free_gpus=free_gpus,
                machines=len(host.claims),
            )
        )
    return rows


def placement_rows(snapshot: Mapping[str, VersionedHost]) -> list[PlacementRow]:
    """GPUs by region and kind: free (nobody holds any of it), claimed, cleaning, quarantined."""
    counts: dict[tuple[str, str], Counter[str]] = {}
    for record in snapshot.values():
        host = record.state
        for gpu, used in zip(host.gpus, host.gpu_used_milli, strict=True):
            # A free GPU that slices of it are held on is not free for a new machine.
            state = GpuState.CLAIMED if gpu.state is GpuState.FREE and used else gpu.state
            counts.setdefault((host.region, gpu.kind), Counter())[str(state)] += 1
    return [
        PlacementRow(
            region=region,
            kind=kind,
            free=bucket["free"],
            claimed=bucket["claimed"],
            cleaning=bucket["cleaning"],
            quarantined=bucket["quarantined"],
        )
        for (region, kind), bucket in sorted(counts.items())
    ]
