"""This host's claims, through the scheduler: the one path by which a machine gets CPUs,
memory and GPUs here, and by which it gives them back.

``place`` runs the same ``Scheduler`` and ``ClaimStore`` that ``hangar bench placement``
measures, constrained to this host; a GPU's state (free, claimed, cleaning, quarantined)
changes only by compare-and-set on the host's claim record, for its whole IOMMU group at
once (the claim unit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hangar.errors import NotFound, StoreError
from hangar.model.config import GuestConfig
from hangar.model.gpu import GpuRecord, GpuState
from hangar.model.host import HostInfo
from hangar.scheduler import (
    Claim,
    ClaimStore,
    Gpu,
    HostState,
    PlacementObserver,
    Scheduler,
    VersionedHost,
)
from hangar.scheduler.machines import NO_OVERCOMMIT, Overcommit, host_state, placement_request

MAX_CAS_ATTEMPTS = 8


class HostPlacement:
    def __init__(
        self,
        claims: ClaimStore,
        host: HostInfo,
        scheduler: Scheduler | None = None,
        observer: PlacementObserver | None = None,
        overcommit: Overcommit = NO_OVERCOMMIT,
        allow_cpu_machines: bool = True,
    ):
        """``observer`` is told how each placement went (metrics); it is given to the
        scheduler made here (one passed in keeps its own). ``overcommit``: the operator's
        ratios for shared machines (host admission). ``allow_cpu_machines``: whether
        CPU-only machines may run here when the host has GPUs (a fleet's GPU pool: no)."""
        self.allow_cpu_machines = allow_cpu_machines
        self.claims = claims
        self.host = host
        self._scheduler = scheduler
        self._observer = observer
        self.overcommit = overcommit

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = Scheduler(self.claims, observer=self._observer)
        return self._scheduler

    # the host record
    def register(
        self,
        gpus: Sequence[GpuRecord],
        allow_cpu_machines: bool | None = None,
        fabric_partitions: Mapping[int, Sequence[int]] | None = None,
    ) -> HostState:
        """Write this host's capacity and GPUs, keeping every claim and GPU state it had.
        ``fabric_partitions``: Fabric Manager's partitions (id -> module ids) on an NVSwitch
        host."""
        for _ in range(MAX_CAS_ATTEMPTS):
            current = self.claims.read_host(self.host.id)
            state = host_state(
                self.host,
                gpus,
                current.state if current is not None else None,
                allow_cpu_machines=(
                    self.allow_cpu_machines if allow_cpu_machines is None else allow_cpu_machines
                ),
                overcommit=self.overcommit,
                fabric_partitions=fabric_partitions,
            )
            if current is None:
                self.claims.put_host(state)
                break
            if self.claims.compare_and_set(self.host.id, current.version, state):
                break
        else:
            raise StoreError(f"registering host {self.host.id} lost every race", retryable=True)
        self.scheduler.refresh_host(self.host.id)
        return state

    def current(self) -> VersionedHost:
        record = self.claims.read_host(self.host.id)
        if record is None:
            raise NotFound(f"host {self.host.id} is not registered", host_id=self.host.id)
        return record

    def gpus(self) -> tuple[Gpu, ...]:
        return self.current().state.gpus

    def gpu(self, bdf: str) -> Gpu | None:
        return next((gpu for gpu in self.gpus() if gpu.bdf == bdf), None)

    def group_of(self, bdf: str) -> list[Gpu]:
        """The GPUs claimed, handed off and quarantined together with ``bdf``: its IOMMU
        group's, by address (the first is the group's lead). Empty if not on this host."""
        state = self.current().state
        gpu = next((g for g in state.gpus if g.bdf == bdf), None)
        return [] if gpu is None else [state.gpus[i] for i in state.group_indexes(gpu.index)]

    def claimed_groups(self, machine_id: str) -> list[list[str]]:
        """The IOMMU groups ``machine_id`` holds, each as its GPUs' addresses."""
        state = self.current().state
        claim = next((c for c in state.claims if c.machine_id == machine_id), None)
        if claim is None or not claim.whole_gpus:
            return []
        groups: dict[tuple[int, ...], list[str]] = {}
        for index in claim.gpu_indexes:
            unit = state.group_indexes(index)
            groups.setdefault(unit, [state.gpus[i].bdf for i in unit])
        return list(groups.values())

    def partition_of(self, bdfs: Sequence[str]) -> int | None:
        """The Fabric Manager partition made of exactly these GPUs (None: there is none)."""
        state = self.current().state
        indexes = tuple(gpu.index for gpu in state.gpus if gpu.bdf in set(bdfs))
        partition = state.partition_of(indexes)
        return None if partition is None else partition.partition_id

    def holders(self) -> dict[str, str]:
        """BDF -> the machine holding that GPU."""
        state = self.current().state
        return {
            state.gpus[index].bdf: claim.machine_id
            for claim in state.claims
            for index in claim.gpu_indexes
        }

    # claims
    def claim_of(self, machine_id: str) -> Claim | None:
        state = self.current().state
        return next((claim for claim in state.claims if claim.machine_id == machine_id), None)

    def claimed_bdfs(self, machine_id: str) -> list[str]:
        state = self.current().state
        claim = next((c for c in state.claims if c.machine_id == machine_id), None)
        return [state.gpus[index].bdf for index in claim.gpu_indexes] if claim else []

    def place(self, machine_id: str, guest: GuestConfig) -> Claim:
        """Claim what ``guest`` needs on this host (``InsufficientCapacity`` if it does not
        fit now); a machine that holds a claim already keeps it."""
        held = self.claim_of(machine_id)
        if held is not None:
            return held
        request = placement_request(
            guest, machine_id=machine_id, host_id=self.host.id, overcommit=self.overcommit
        )
        return self.scheduler.place(request).claim

    def release(self, machine_id: str) -> list[str]:
        """Give back what ``machine_id`` holds; its GPUs go to ``cleaning``. Returns their
        addresses (none if it held nothing)."""
        bdfs = self.claimed_bdfs(machine_id)
        self.scheduler.release(self.host.id, machine_id)
        return bdfs

    def live_claims(self) -> list[str]:
        return [claim.machine_id for claim in self.current().state.claims]

    # GPU states (the handoff between tenants)
    def set_gpu_state(self, bdf: str, state: GpuState, expected: GpuState | None) -> bool:
        """Move ``bdf`` and every GPU of its IOMMU group, none of them held, to ``state`` in
        one compare-and-set, if all of them are in ``expected`` (any state when None).
        False if they were not."""
        for _ in range(MAX_CAS_ATTEMPTS):
            record = self.current()
            gpu = next((g for g in record.state.gpus if g.bdf == bdf), None)
            if gpu is None:
                raise NotFound(f"GPU {bdf} is not on host {self.host.id}", bdf=bdf)
            group = record.state.group_indexes(gpu.index)
            states = {record.state.gpus[index].state for index in group}
            if expected is not None and states != {expected}:
                return False
            if states == {state}:
                return True
            new_state = record.state.with_gpu_states(group, state)
            if self.claims.compare_and_set(self.host.id, record.version, new_state):
                self.scheduler.refresh_host(self.host.id)
                return True
        raise StoreError(f"GPU {bdf}: every compare-and-set lost a race", bdf=bdf)
