"""What the scheduler reads and writes: hosts with their claims, and placement requests.

Plain frozen dataclasses, because placement runs thousands of times a second over them. The
store converts its records (``hangar.model``) to ``HostState`` and back; a ``HostState`` that
over-commits anything cannot be built, so no code path can write one.

Units: CPU in milli-CPUs (the API multiplies Fly's ``cpus`` by 1000), memory in MB, GPU
capacity in milli-GPUs (1000 = one whole GPU; a slice or time share is a part of one GPU).

A GPU is used in one mode at a time (``GpuMode``), read from its claims: whole (one claim of
all of it), MIG (claims of instances of its operator-set ``mig_layout``), or shared (time
shares, each a part of it with a memory cap in proportion). It serves whole again only once
every slice or share is released.

A layout means one of two things (``Gpu.mig_fixed``): in a simulation it is a *possibility*,
the packer cuts an idle GPU into it while slices are held and uses it whole otherwise; on a
real host it is the operator's MIG mode, already on (NVML reports the instances), and the GPU
serves only slices of that layout, never a whole-GPU claim or a time share.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hangar.errors import InvalidRequest
from hangar.model.gpu import GpuState
from hangar.scheduler.mig import MIG_PROFILES, check_layout, profile_milli

MILLI_PER_GPU = 1000


class Pool(enum.StrEnum):
    GPU = "gpu"
    GENERAL = "general"


class GpuMode(enum.StrEnum):
    """How a GPU is used right now (derived from its claims; ``idle`` when nobody holds it)."""

    IDLE = "idle"
    WHOLE = "whole"
    MIG = "mig"
    SHARED = "shared"


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    """Position on the host; claims name GPUs by it."""
    kind: str
    bdf: str
    numa_node: int = 0
    nvlink_partition: int | None = None
    """GPUs sharing a partition talk over NVLink; a multi-GPU machine stays inside one."""
    state: GpuState = GpuState.FREE
    iommu_group: int | None = None
    """GPUs sharing an IOMMU group are one claim unit: VFIO hands the whole group to one
    guest, so a whole-GPU claim holds every GPU of the group or none of them."""
    mig_layout: tuple[str, ...] = ()
    """MIG instances (profile names) the operator cuts this GPU into when a slice is asked of
    it; empty: the GPU never runs in MIG mode. Instances are named by their position here."""
    mig_fixed: bool = False
    """The GPU is in MIG mode now and stays so (the operator's setting on a real host): it
    serves slices of ``mig_layout`` only, never whole or shared. False: the layout, if any,
    is a possibility the packer may use on the idle GPU (the simulations)."""


@dataclass(frozen=True, slots=True)
class NvlinkPartition:
    """A Fabric Manager partition of an NVSwitch host: GPUs that may share NVLink inside
    one machine, activated for it before boot."""

    partition_id: int
    gpu_indexes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Claim:
    """What one machine holds on one host."""

    machine_id: str
    cpu_milli: int
    memory_mb: int
    gpu_indexes: tuple[int, ...] = ()
    gpu_milli: int = 0
    """Per GPU in ``gpu_indexes``: 1000 for whole GPUs, less for a slice of one GPU."""
    gpu_slice: str = ""
    """A MIG profile (``1g.10gb``): the claim holds instance ``mig_instance`` of its one GPU's
    layout and ``gpu_milli`` is that profile's share. Empty for whole GPUs and time shares."""
    mig_instance: int = -1

    @property
    def whole_gpus(self) -> bool:
        return bool(self.gpu_indexes) and self.gpu_milli == MILLI_PER_GPU and not self.gpu_slice

    @property
    def mode(self) -> GpuMode:
        """The mode this claim puts its GPUs in (``idle`` for a claim without GPUs)."""
        if not self.gpu_indexes:
            return GpuMode.IDLE
        if self.gpu_slice:
            return GpuMode.MIG
        return GpuMode.WHOLE if self.gpu_milli == MILLI_PER_GPU else GpuMode.SHARED


@dataclass(frozen=True, slots=True)
class HostState:
    """One host's capacity and everything claimed on it (one store record, one version)."""

    id: str
    region: str
    pool: Pool
    cpu_milli: int
    memory_mb: int
    gpus: tuple[Gpu, ...] = ()
    zone: str = ""
    rack: str = ""
    allow_cpu_machines: bool = False
    """Operator's per-host exception: CPU-only machines may run on this ``gpu`` host."""
    claims: tuple[Claim, ...] = ()
    fabric_partitions: tuple[NvlinkPartition, ...] | None = None
    """On an NVSwitch host, its Fabric Manager partitions: a claim of several GPUs is
    exactly one of them. None: no NVSwitch fabric; empty: a fabric whose partitions are
    unknown, where only single GPUs (NVLink off) can be claimed."""
    free_cpu_milli: int = field(init=False)
    free_memory_mb: int = field(init=False)
    gpu_used_milli: tuple[int, ...] = field(init=False)
    """Per GPU (by index): milli-GPUs held by claims."""
    gpu_modes: tuple[GpuMode, ...] = field(init=False)
    """Per GPU (by index): the mode its claims put it in."""
    mig_taken: tuple[frozenset[int], ...] = field(init=False)
    """Per GPU (by index): the instances of its MIG layout that claims hold."""

    def __post_init__(self) -> None:
        cpu = self.cpu_milli
        memory = self.memory_mb
        used = [0] * len(self.gpus)
        modes = [GpuMode.IDLE] * len(self.gpus)
        taken: list[set[int]] = [set() for _ in self.gpus]
        for position, gpu in enumerate(self.gpus):
            if gpu.index != position:
                raise InvalidRequest(
                    f"host {self.id}: GPU at position {position} has index {gpu.index}",
                    field="gpus",
                )
            if gpu.kind != self.gpus[0].kind:
                raise InvalidRequest(f"host {self.id} mixes GPU kinds", field="gpus")
            check_layout(gpu.kind, gpu.mig_layout)
            if gpu.mig_fixed and not gpu.mig_layout:
                raise InvalidRequest(
                    f"host {self.id}: GPU {gpu.index} is fixed in MIG mode without a layout",
                    field="gpus",
                )
        for claim in self.claims:
            cpu -= claim.cpu_milli
            memory -= claim.memory_mb
            if claim.gpu_indexes and not 0 < claim.gpu_milli <= MILLI_PER_GPU:
                raise InvalidRequest(
                    f"host {self.id}: claim {claim.machine_id} holds {claim.gpu_milli} milli-GPU",
                    field="claims",
                )
            mode = claim.mode
            for index in claim.gpu_indexes:
                if not 0 <= index < len(used):
                    raise InvalidRequest(
                        f"host {self.id}: claim {claim.machine_id} names GPU {index}",
                        field="claims",
                    )
                clash = modes[index] not in (GpuMode.IDLE, mode)
                if clash or (mode is GpuMode.WHOLE and used[index]):
                    raise InvalidRequest(
                        f"host {self.id}: GPU {index} cannot be {mode} and {modes[index]} at once",
                        field="claims",
                    )
                modes[index] = mode
                used[index] += claim.gpu_milli
            if claim.gpu_slice:
                self._check_slice(claim, taken)
        if cpu < 0 or memory < 0 or any(milli > MILLI_PER_GPU for milli in used):
            raise InvalidRequest(f"host {self.id}: claims exceed its capacity", field="claims")
        self._check_groups()
        object.__setattr__(self, "free_cpu_milli", cpu)
        object.__setattr__(self, "free_memory_mb", memory)
        object.__setattr__(self, "gpu_used_milli", tuple(used))
        object.__setattr__(self, "gpu_modes", tuple(modes))
        object.__setattr__(self, "mig_taken", tuple(frozenset(t) for t in taken))

    def _check_slice(self, claim: Claim, taken: list[set[int]]) -> None:
        """A slice claim holds one free instance of its GPU's layout, of the claimed profile."""
        if len(claim.gpu_indexes) != 1:
            raise InvalidRequest(
                f"host {self.id}: slice claim {claim.machine_id} must name one GPU",
                field="claims",
            )
        index = claim.gpu_indexes[0]
        layout = self.gpus[index].mig_layout
        instance = claim.mig_instance
        if not 0 <= instance < len(layout) or layout[instance] != claim.gpu_slice:
            raise InvalidRequest(
                f"host {self.id}: GPU {index} has no {claim.gpu_slice} instance {instance}",
                field="claims",
            )
        if claim.gpu_milli != profile_milli(claim.gpu_slice):
            raise InvalidRequest(
                f"host {self.id}: slice claim {claim.machine_id} holds {claim.gpu_milli} "
                f"milli-GPU, not its profile's {profile_milli(claim.gpu_slice)}",
                field="claims",
            )
        if instance in taken[index]:
            raise InvalidRequest(
                f"host {self.id}: instance {instance} of GPU {index} is already held",
                field="claims",
            )
        taken[index].add(instance)

    def free_instances(self, index: int) -> tuple[int, ...]:
        """Instances of GPU ``index``'s MIG layout a slice claim could take now."""
        gpu = self.gpus[index]
        if gpu.state is not GpuState.FREE or self.gpu_modes[index] not in (
            GpuMode.IDLE,
            GpuMode.MIG,
        ):
            return ()
        taken = self.mig_taken[index]
        return tuple(i for i in range(len(gpu.mig_layout)) if i not in taken)

    def whole_free_indexes(self) -> tuple[int, ...]:
        """GPUs a whole-GPU claim could take now: free, held by nobody, not fixed in MIG
        mode (IOMMU groups and partitions aside)."""
        used = self.gpu_used_milli
        return tuple(
            gpu.index
            for gpu in self.gpus
            if gpu.state is GpuState.FREE and not used[gpu.index] and not gpu.mig_fixed
        )

    def _check_groups(self) -> None:
        """No whole-GPU claim holds part of an IOMMU group; partitions name real GPUs."""
        if any(gpu.iommu_group is not None for gpu in self.gpus):
            for claim in self.claims:
                held = set(claim.gpu_indexes)
                if claim.whole_gpus and any(
                    not set(self.group_indexes(index)) <= held for index in held
                ):
                    raise InvalidRequest(
                        f"host {self.id}: claim {claim.machine_id} splits an IOMMU group",
                        field="claims",
                    )
        for partition in self.fabric_partitions or ():
            if not all(0 <= index < len(self.gpus) for index in partition.gpu_indexes):
                raise InvalidRequest(
                    f"host {self.id}: partition {partition.partition_id} names a GPU it "
                    "does not have",
                    field="fabric_partitions",
                )

    @property
    def kind(self) -> str:
        """The host's GPU kind ("" for a host without GPUs); hosts carry one kind."""
        return self.gpus[0].kind if self.gpus else ""

    def group_indexes(self, index: int) -> tuple[int, ...]:
        """The GPUs claimed together with GPU ``index``: its IOMMU group's (itself alone
        when it has no group)."""
        group = self.gpus[index].iommu_group
        if group is None:
            return (index,)
        return tuple(gpu.index for gpu in self.gpus if gpu.iommu_group == group)

    def partition_of(self, indexes: tuple[int, ...]) -> NvlinkPartition | None:
        """The Fabric Manager partition made of exactly these GPUs, if there is one."""
        wanted = sorted(indexes)
        return next(
            (p for p in self.fabric_partitions or () if sorted(p.gpu_indexes) == wanted), None
        )

    def with_claim(self, claim: Claim) -> HostState:
        if any(existing.machine_id == claim.machine_id for existing in self.claims):
            raise InvalidRequest(
                f"machine {claim.machine_id} already holds a claim on host {self.id}",
                field="machine_id",
            )
        if not claim.gpu_slice:
            gpus = self.gpus
            fixed = [i for i in claim.gpu_indexes if 0 <= i < len(gpus) and gpus[i].mig_fixed]
            if fixed:
                raise InvalidRequest(
                    f"host {self.id}: GPU {fixed[0]} is in MIG mode and serves only slices of "
                    f"its layout, not machine {claim.machine_id}'s {claim.mode} claim",
                    field="gpus",
                )
        gpus = self.gpus
        if claim.whole_gpus:
            held = set(claim.gpu_indexes)
            gpus = tuple(
                _with_state(gpu, GpuState.CLAIMED) if gpu.index in held else gpu for gpu in gpus
            )
        return _replace_claims(self, (*self.claims, claim), gpus)

    def without_claim(self, machine_id: str) -> HostState:
        """Drop a machine's claim; GPUs nobody holds any more go to ``cleaning`` (handoff)."""
        released = [claim for claim in self.claims if claim.machine_id == machine_id]
        if not released:
            return self
        remaining = tuple(claim for claim in self.claims if claim.machine_id != machine_id)
        still_used = {index for claim in remaining for index in claim.gpu_indexes}
        touched = {index for claim in released for index in claim.gpu_indexes}
        gpus = tuple(
            _with_state(gpu, GpuState.CLEANING)
            if gpu.index in touched and gpu.index not in still_used
            else gpu
            for gpu in self.gpus
        )
        return _replace_claims(self, remaining, gpus)

    def with_gpu_state(self, index: int, state: GpuState) -> HostState:
        """The agent's transitions: cleaning -> free after a scrub, anything -> quarantined."""
        return self.with_gpu_states((index,), state)

    def with_gpu_states(self, indexes: tuple[int, ...], state: GpuState) -> HostState:
        """The same transition for several GPUs at once (an IOMMU group's)."""
        wanted = set(indexes)
        gpus = tuple(_with_state(gpu, state) if gpu.index in wanted else gpu for gpu in self.gpus)
        return _replace_claims(self, self.claims, gpus)


def _with_state(gpu: Gpu, state: GpuState) -> Gpu:
    return Gpu(
        gpu.index,
        gpu.kind,
        gpu.bdf,
        gpu.numa_node,
        gpu.nvlink_partition,
        state,
        gpu.iommu_group,
        gpu.mig_layout,
        gpu.mig_fixed,
    )


def _replace_claims(host: HostState, claims: tuple[Claim, ...], gpus: tuple[Gpu, ...]) -> HostState:
    return HostState(
        id=host.id,
        region=host.region,
        pool=host.pool,
        cpu_milli=host.cpu_milli,
        memory_mb=host.memory_mb,
        gpus=gpus,
        zone=host.zone,
        rack=host.rack,
        allow_cpu_machines=host.allow_cpu_machines,
        claims=claims,
        fabric_partitions=host.fabric_partitions,
    )


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """One machine to place: whole GPUs (``gpus``), a time share of one GPU (``gpu_milli``, the
    API's ``gpu_share`` x 1000), a MIG instance (``gpu_slice``), or none (a CPU-only machine)."""

    cpu_milli: int
    memory_mb: int
    gpus: int = 0
    gpu_milli: int = 0
    gpu_kinds: frozenset[str] | None = None
    """Acceptable GPU kinds; ``None`` accepts any kind."""
    region: str = ""
    """Region expression: ``ord``, ``ord,iad`` (tried in order) or an alias such as ``us``."""
    zone: str | None = None
    """Affinity: the zone of the machine or volume this one must sit next to."""
    machine_id: str = ""
    host_id: str = ""
    """A hard constraint: only this host (a machine's own host, or its volume's)."""
    gpu_slice: str = ""
    """A MIG profile (``1g.10gb``): one instance of it, on a GPU whose layout has one."""

    def __post_init__(self) -> None:
        if self.cpu_milli < 0:
            raise InvalidRequest("cpu_milli must not be negative", field="cpu_milli")
        if self.memory_mb < 0:
            raise InvalidRequest("memory_mb must not be negative", field="memory_mb")
        if self.gpus < 0:
            raise InvalidRequest("gpus must not be negative", field="gpus")
        if self.gpus and self.gpu_milli:
            raise InvalidRequest("ask for whole GPUs or a GPU share, not both", field="gpu_milli")
        if not 0 <= self.gpu_milli < MILLI_PER_GPU:
            raise InvalidRequest("gpu_milli must be between 1 and 999", field="gpu_milli")
        if self.gpu_kinds is not None and not self.gpu_kinds:
            raise InvalidRequest("gpu_kinds must name at least one kind", field="gpu_kinds")
        if self.gpu_slice:
            if self.gpus or self.gpu_milli:
                raise InvalidRequest(
                    "ask for whole GPUs, a GPU share or a MIG slice, only one", field="gpu_slice"
                )
            profile_milli(self.gpu_slice)
            if self.gpu_kinds is not None and not any(
                self.gpu_slice in MIG_PROFILES.get(kind, {}) for kind in self.gpu_kinds
            ):
                raise InvalidRequest(
                    f"none of {', '.join(sorted(self.gpu_kinds))} has MIG profile {self.gpu_slice}",
                    field="gpu_slice",
                )

    @property
    def gpu_demand_milli(self) -> int:
        if self.gpu_slice:
            return profile_milli(self.gpu_slice)
        return self.gpus * MILLI_PER_GPU if self.gpus else self.gpu_milli

    @property
    def wants_gpu(self) -> bool:
        return self.gpu_demand_milli > 0

    def accepts_kind(self, kind: str) -> bool:
        return self.gpu_kinds is None or kind in self.gpu_kinds


@dataclass(frozen=True, slots=True)
class Placement:
    host_id: str
    region: str
    claim: Claim
