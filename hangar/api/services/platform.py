"""Capacity questions (``/v1/platform``) and GPU admission, answered by the scheduler's policy
over a snapshot of this host: its GPUs as the store tracks them, and what live machines hold."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from hangar.errors import InvalidRequest, Unprocessable
from hangar.images.driver_bundle import DriverBundleError, configured_driver_bundle
from hangar.model.config import GuestConfig, MachineConfig
from hangar.model.gpu import GpuState
from hangar.model.host import HostInfo
from hangar.scheduler import (
    Claim,
    Gpu,
    HostState,
    PlacementRequest,
    Pool,
    VersionedHost,
    capacity_by_region,
    capacity_error,
    dry_run_placements,
)
from hangar.store.protocol import ClusterStore

# Shared vCPUs are time slices: a core carries this many of them; a performance vCPU is a core.
SHARED_VCPUS_PER_CORE = 16


class PlacementsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    guest: GuestConfig = Field(default_factory=GuestConfig)
    region: Annotated[str, Field(max_length=128)] = ""
    count: Annotated[int, Field(ge=1, le=1000)] = 1


class RegionPlacementView(BaseModel):
    region: str
    requested: int
    placeable: int


class PlacementsView(BaseModel):
    regions: list[RegionPlacementView]


class RegionView(BaseModel):
    code: str
    gpu_kinds: list[str]
    capacity: int
    """How many more machines of the asked shape (default: one whole GPU) fit."""


class RegionsView(BaseModel):
    regions: list[RegionView]


def cpu_milli(guest: GuestConfig) -> int:
    per_vcpu = 1000 * SHARED_VCPUS_PER_CORE if guest.cpu_kind == "performance" else 1000
    return guest.cpus * per_vcpu


def placement_request(guest: GuestConfig, region: str, machine_id: str = "") -> PlacementRequest:
    kinds = frozenset([guest.gpu_kind]) if guest.gpu_kind else None
    return PlacementRequest(
        cpu_milli=cpu_milli(guest),
        memory_mb=guest.memory_mb,
        gpus=guest.gpus or 0,
        gpu_kinds=kinds,
        region=region,
        machine_id=machine_id,
    )


class PlatformService:
    def __init__(
        self, store: ClusterStore, host: HostInfo, driver_bundle: Path | None = None
    ) -> None:
        self._store = store
        self._host = host
        self._driver_bundle = driver_bundle

    def snapshot(self) -> dict[str, VersionedHost]:
        records = sorted(self._store.list_gpus(host_id=self._host.id), key=lambda gpu: gpu.bdf)
        kinds = [gpu.kind for gpu in records]
        # A host carries one kind in the scheduler's model: the one it has most of.
        kind = max(set(kinds), key=kinds.count) if kinds else ""
        records = [gpu for gpu in records if gpu.kind == kind]
        index_of = {gpu.bdf: position for position, gpu in enumerate(records)}
        held_by: dict[str, list[int]] = {}
        for gpu in records:
            if gpu.state == GpuState.CLAIMED:
                held_by.setdefault(gpu.machine_id, []).append(index_of[gpu.bdf])
        partitions = {
            domain: n
            for n, domain in enumerate(
                sorted({gpu.nvlink_domain for gpu in records if gpu.nvlink_domain})
            )
        }
        gpus = tuple(
            Gpu(
                index=index_of[gpu.bdf],
                kind=gpu.kind,
                bdf=gpu.bdf,
                numa_node=gpu.numa_node or 0,
                nvlink_partition=partitions.get(gpu.nvlink_domain or ""),
                state=gpu.state if gpu.available else GpuState.QUARANTINED,
            )
            for gpu in records
        )
        host = HostState(
            id=self._host.id,
            region=self._host.region,
            pool=Pool.GPU if gpus else Pool.GENERAL,
            cpu_milli=self._host.cpus * 1000 * SHARED_VCPUS_PER_CORE,
            memory_mb=self._host.allocatable_memory_mb,
            gpus=gpus,
        )
        for machine in self._store.list_machines(None):
            if not machine.state.holds_resources:
                continue
            held = tuple(held_by.get(machine.id, ()))
            claim = Claim(
                machine.id,
                cpu_milli(machine.config.guest),
                machine.config.guest.memory_mb,
                held,
                1000 if held else 0,
            )
            try:
                host = host.with_claim(claim)
            except InvalidRequest:
                continue  # an over-committed host: what does not fit is not counted twice
        return {host.id: VersionedHost(host, 1)}

    def placements(self, request: PlacementsRequest) -> PlacementsView:
        results = dry_run_placements(
            self.snapshot(), placement_request(request.guest, request.region), request.count
        )
        return PlacementsView(
            regions=[
                RegionPlacementView(region=r.region, requested=r.requested, placeable=r.placeable)
                for r in results
            ]
        )

    def regions(self, gpu_kind: str | None) -> RegionsView:
        snapshot = self.snapshot()
        counts = capacity_by_region(snapshot, gpu_kind)
        kinds: dict[str, set[str]] = {}
        for record in snapshot.values():
            if record.state.kind:
                kinds.setdefault(record.state.region, set()).add(record.state.kind)
        return RegionsView(
            regions=[
                RegionView(code=region, gpu_kinds=sorted(kinds.get(region, set())), capacity=count)
                for region, count in counts.items()
            ]
        )

    def admit_gpu_machine(self, config: MachineConfig, region: str) -> None:
        """A GPU machine is refused at create when its guests could get no driver, or when
        the policy finds no room for it now (the device claim itself is the agent's, at boot)."""
        if not config.guest.gpus:
            return
        try:
            bundle = configured_driver_bundle(self._driver_bundle)
        except DriverBundleError as exc:
            raise Unprocessable(
                f"config.guest.gpu_kind: {exc}", field="config.guest.gpu_kind"
            ) from None
        if not bundle.exists():
            raise Unprocessable(
                f"config.guest.gpu_kind: the GPU driver bundle {bundle} does not exist",
                field="config.guest.gpu_kind",
            )
        request = placement_request(config.guest, region)
        results = dry_run_placements(self.snapshot(), request, 1)
        if not any(result.placeable for result in results):
            error = capacity_error(request, (region,))
            error.fields["field"] = "config.guest.gpu_kind"
            raise error
