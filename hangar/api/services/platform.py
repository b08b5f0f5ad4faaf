"""Capacity questions (``/v1/platform``) and GPU admission, answered by the scheduler's policy
over a snapshot of the claim store: every host's GPUs and what the machines there hold (the
same records the agents claim on).

Only the operator is answered from what the hosts have left. An org is answered within its
quota, over the hosts as if they were empty: what other orgs run never shows in the answer
(a read-only token must not watch another org's machines come and go)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from hangar.errors import InsufficientCapacity, Unprocessable
from hangar.images.driver_bundle import DriverBundleError, configured_driver_bundle
from hangar.model.config import GuestConfig, MachineConfig
from hangar.model.gpu import GpuState
from hangar.model.gpu_kinds import GPU_KINDS
from hangar.scheduler import (
    ClaimStore,
    HostState,
    VersionedHost,
    capacity_by_region,
    capacity_error,
    dry_run_placements,
)
from hangar.scheduler.machines import Overcommit, placement_request
from hangar.scheduler.mig import MIG_PROFILES

RoomOf = Callable[[GuestConfig], "int | None"]
"""How many more machines of this guest shape the caller's org may have (None: no limit)."""


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


def unclaimed(state: HostState) -> HostState:
    """The host as if nothing ran on it (GPUs out of use for a fault stay out)."""
    in_use = (GpuState.CLAIMED, GpuState.CLEANING)
    gpus = tuple(
        replace(gpu, state=GpuState.FREE) if gpu.state in in_use else gpu for gpu in state.gpus
    )
    return HostState(
        id=state.id,
        region=state.region,
        pool=state.pool,
        cpu_milli=state.cpu_milli,
        memory_mb=state.memory_mb,
        gpus=gpus,
        zone=state.zone,
        rack=state.rack,
        allow_cpu_machines=state.allow_cpu_machines,
    )


def _without(state: HostState, machine_id: str) -> HostState:
    """The host as if ``machine_id`` held nothing on it (its GPUs free again, unless another
    claim holds a share or slice of one)."""
    held = next((claim for claim in state.claims if claim.machine_id == machine_id), None)
    if held is None:
        return state
    others = tuple(claim for claim in state.claims if claim.machine_id != machine_id)
    still_held = {index for claim in others for index in claim.gpu_indexes}
    freed = set(held.gpu_indexes) - still_held
    gpus = tuple(
        replace(gpu, state=GpuState.FREE) if gpu.index in freed else gpu for gpu in state.gpus
    )
    return replace(state, gpus=gpus, claims=others)


def _capped(count: int, room: int | None) -> int:
    return count if room is None else max(0, min(count, room))


class PlatformService:
    def __init__(
        self,
        claims: ClaimStore,
        driver_bundle: Path | None = None,
        overcommit: Overcommit | None = None,
        share_kinds: frozenset[str] = frozenset(),
    ) -> None:
        """``share_kinds``: the GPU kinds the operator opened to time shares."""
        self._claims = claims
        self._driver_bundle = driver_bundle
        self.overcommit = overcommit or Overcommit()
        self._share_kinds = share_kinds

    def admit_gpu_part(self, config: MachineConfig, region: str) -> None:
        """A MIG slice must be a profile of its kind, a share must be of a kind opened to
        sharing (each a 422 listing what exists), and the policy must find room now."""
        guest = config.guest
        kind = guest.gpu_kind or ""
        if guest.gpu_slice is not None:
            profiles = sorted(MIG_PROFILES.get(kind, {}))
            if guest.gpu_slice not in profiles:
                message = (
                    f"config.guest.gpu_slice: {kind} has no MIG profile {guest.gpu_slice}; "
                    + (
                        f"its profiles: {', '.join(profiles)}"
                        if profiles
                        else f"{kind} has no MIG; kinds with MIG: {', '.join(sorted(MIG_PROFILES))}"
                    )
                )
                raise Unprocessable(
                    message,
                    field="config.guest.gpu_slice",
                    gpu_kind=kind,
                    profiles=profiles,
                    mig_kinds=sorted(MIG_PROFILES),
                )
        elif guest.gpu_share is not None and kind not in self._share_kinds:
            opened = sorted(self._share_kinds)
            raise Unprocessable(
                f"config.guest.gpu_share: {kind} is not open to GPU shares on this platform; "
                + (f"kinds open to shares: {', '.join(opened)}" if opened else "none is"),
                field="config.guest.gpu_share",
                gpu_kind=kind,
                share_kinds=opened,
            )
        request = placement_request(guest, region, overcommit=self.overcommit)
        if not any(result.placeable for result in dry_run_placements(self.snapshot(), request, 1)):
            error = capacity_error(request, (region,))
            error.fields["field"] = (
                "config.guest.gpu_slice" if guest.gpu_slice else "config.guest.gpu_share"
            )
            raise error

    def snapshot(self) -> Mapping[str, VersionedHost]:
        """Every host with its claims, as the scheduler reads them."""
        return self._claims.snapshot()

    def _snapshot_for(self, room_of: RoomOf | None) -> Mapping[str, VersionedHost]:
        snapshot = self.snapshot()
        if room_of is None:
            return snapshot
        return {
            host_id: VersionedHost(unclaimed(record.state), record.version)
            for host_id, record in snapshot.items()
        }

    def placements(
        self, request: PlacementsRequest, room_of: RoomOf | None = None
    ) -> PlacementsView:
        """``room_of``: the caller is an org, answered within its quota over empty hosts;
        None: the operator, answered from what the hosts have left."""
        results = dry_run_placements(
            self._snapshot_for(room_of),
            placement_request(request.guest, request.region, overcommit=self.overcommit),
            request.count,
        )
        room = room_of(request.guest) if room_of is not None else None
        return PlacementsView(
            regions=[
                RegionPlacementView(
                    region=r.region, requested=r.requested, placeable=_capped(r.placeable, room)
                )
                for r in results
            ]
        )

    def regions(self, gpu_kind: str | None, room_of: RoomOf | None = None) -> RegionsView:
        snapshot = self._snapshot_for(room_of)
        counts = capacity_by_region(snapshot, gpu_kind)
        if room_of is not None:
            # One whole GPU of the kind, with the least memory a machine can have.
            known = gpu_kind in {kind.name for kind in GPU_KINDS}
            template = (
                GuestConfig(cpu_kind="performance", gpu_kind=gpu_kind, gpus=1, memory_mb=128)
                if gpu_kind and known
                else GuestConfig(memory_mb=128)
            )
            room = room_of(template)
            counts = {region: _capped(count, room) for region, count in counts.items()}
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

    def admit(self, config: MachineConfig, region: str, machine_id: str = "") -> None:
        """Host-wide admission: refuse (``insufficient_capacity``, 422) a machine that does
        not fit in what the hosts have left now, counting the operator's overcommit; the
        machine's own claim (an update of a running machine) is counted as free. The agent's
        claim at boot is what holds; this answers early and clearly."""
        snapshot = self.snapshot()
        if machine_id:
            snapshot = {
                host_id: VersionedHost(_without(record.state, machine_id), record.version)
                for host_id, record in snapshot.items()
            }
        request = placement_request(config.guest, region, overcommit=self.overcommit)
        if not any(result.placeable for result in dry_run_placements(snapshot, request, 1)):
            error = capacity_error(request, (region,))
            error.fields["field"] = "config.guest"
            raise error

    def check_room_on(self, guest: GuestConfig, region: str, host_id: str, field: str) -> None:
        """A machine bound to ``host_id`` (its volumes are there) must fit there now: the
        scheduler's hard constraint, asked of the same claim records the agent claims on."""
        request = placement_request(guest, region, host_id=host_id, overcommit=self.overcommit)
        results = dry_run_placements(self.snapshot(), request, 1)
        if not any(result.placeable for result in results):
            raise InsufficientCapacity(
                f"{field}: host {host_id}, where the volume is, has no room now for "
                f"{guest.cpus} CPU(s), {guest.memory_mb} MB"
                + (f" and {guest.gpus} {guest.gpu_kind} GPU(s)" if guest.gpus else ""),
                field=field,
                host_id=host_id,
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
        request = placement_request(config.guest, region, overcommit=self.overcommit)
        results = dry_run_placements(self.snapshot(), request, 1)
        if not any(result.placeable for result in results):
            error = capacity_error(request, (region,))
            error.fields["field"] = "config.guest.gpu_kind"
            raise error
