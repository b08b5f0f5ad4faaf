"""hangar's machines and hosts in the scheduler's terms: a machine's guest config as a
``PlacementRequest``, and a host's capacity and GPUs as a ``HostState``.

Units: a performance vCPU is a whole core; a shared vCPU is a time slice of one, and a core
carries :data:`SHARED_VCPUS_PER_CORE` of them, as on Fly.

The operator may overcommit shared machines (:class:`Overcommit`): the host record offers
``cpu`` times its CPU shares and ``memory`` times its memory, while what must never be
overcommitted claims that many times its size, so it still takes exactly what it is: a
performance vCPU (a whole core) and the memory of a GPU machine (VFIO pins all of it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from hangar.model.config import GuestConfig
from hangar.model.gpu import GpuRecord, GpuState
from hangar.model.host import HostInfo
from hangar.scheduler.model import Claim, Gpu, HostState, NvlinkPartition, PlacementRequest, Pool

log = logging.getLogger(__name__)

SHARED_VCPUS_PER_CORE = 16
MILLI_PER_CORE = 1000 * SHARED_VCPUS_PER_CORE


@dataclass(frozen=True)
class Overcommit:
    """Shared CPU shares and memory admitted per unit the host has (1.0: none)."""

    cpu: float = 1.0
    memory: float = 1.0

    def __post_init__(self) -> None:
        if self.cpu < 1.0 or self.memory < 1.0:
            raise ValueError("overcommit ratios are 1.0 or more")


NO_OVERCOMMIT = Overcommit()


def cpu_milli(guest: GuestConfig, overcommit: Overcommit = NO_OVERCOMMIT) -> int:
    """What a guest's vCPUs take of a host, in the scheduler's milli-CPUs."""
    if guest.cpu_kind == "performance":
        return guest.cpus * round(MILLI_PER_CORE * overcommit.cpu)
    return guest.cpus * 1000


def memory_mb(guest: GuestConfig, overcommit: Overcommit = NO_OVERCOMMIT) -> int:
    """What a guest's memory takes of a host's (overcommitted) memory."""
    if guest.gpus:
        return round(guest.memory_mb * overcommit.memory)
    return guest.memory_mb


def placement_request(
    guest: GuestConfig,
    region: str = "",
    machine_id: str = "",
    host_id: str = "",
    overcommit: Overcommit = NO_OVERCOMMIT,
) -> PlacementRequest:
    kinds = frozenset([guest.gpu_kind]) if guest.gpu_kind else None
    return PlacementRequest(
        cpu_milli=cpu_milli(guest, overcommit),
        memory_mb=memory_mb(guest, overcommit),
        gpus=guest.gpus or 0,
        gpu_milli=guest.gpu_share_milli,
        gpu_slice=guest.gpu_slice or "",
        gpu_kinds=kinds,
        region=region,
        machine_id=machine_id,
        host_id=host_id,
    )


def host_state(
    host: HostInfo,
    gpus: Sequence[GpuRecord],
    previous: HostState | None = None,
    allow_cpu_machines: bool = True,
    overcommit: Overcommit = NO_OVERCOMMIT,
    fabric_partitions: Mapping[int, Sequence[int]] | None = None,
) -> HostState:
    """The host as the scheduler places on it: its CPUs and memory, and its GPUs of one kind
    (the kind it has most of; a host carries one kind) with their IOMMU groups. GPUs keep
    the state and MIG layout they had in ``previous``, and claims keep their GPUs by PCI
    address; a GPU unfit for passthrough is never offered (quarantined). A GPU whose record
    reports MIG instances is in MIG mode (``Gpu.mig_fixed``): it serves only slices of that
    layout, never a whole-GPU or shared machine.
    ``allow_cpu_machines``: CPU-only machines may run on a GPU host (the one-host default; a
    fleet's GPU hosts say no).
    ``fabric_partitions``: on an NVSwitch host, Fabric Manager's partitions (id -> the
    GPUs' module ids); several GPUs are then claimed only as one of them."""
    records = sorted(gpus, key=lambda gpu: gpu.bdf)
    kinds = [gpu.kind for gpu in records]
    kind = max(sorted(set(kinds)), key=kinds.count) if kinds else ""
    skipped = [gpu.bdf for gpu in records if gpu.kind != kind]
    if skipped:
        log.warning("host %s carries %s GPUs; not offering %s", host.id, kind, skipped)
    records = [gpu for gpu in records if gpu.kind == kind]
    before = {gpu.bdf: gpu for gpu in previous.gpus} if previous is not None else {}
    partitions = {
        domain: n
        for n, domain in enumerate(
            sorted({gpu.nvlink_domain for gpu in records if gpu.nvlink_domain})
        )
    }
    state_gpus = tuple(
        Gpu(
            index=index,
            kind=gpu.kind,
            bdf=gpu.bdf,
            numa_node=gpu.numa_node or 0,
            nvlink_partition=partitions.get(gpu.nvlink_domain or ""),
            state=_gpu_state(gpu, before.get(gpu.bdf)),
            iommu_group=gpu.iommu_group,
            mig_layout=_mig_layout(gpu, before.get(gpu.bdf)),
            mig_fixed=bool(gpu.mig_layout),
        )
        for index, gpu in enumerate(records)
    )
    index_of = {gpu.bdf: gpu.index for gpu in state_gpus}
    claims: list[Claim] = []
    for claim in previous.claims if previous is not None else ():
        assert previous is not None
        bdfs = [previous.gpus[i].bdf for i in claim.gpu_indexes]
        lost = [bdf for bdf in bdfs if bdf not in index_of]
        if lost:
            log.error(
                "claim of %s names GPUs no longer on host %s: %s", claim.machine_id, host.id, lost
            )
        indexes = tuple(index_of[bdf] for bdf in bdfs if bdf in index_of)
        claims.append(
            replace(claim, gpu_indexes=indexes, gpu_milli=claim.gpu_milli)
            if indexes
            else Claim(claim.machine_id, claim.cpu_milli, claim.memory_mb)
        )
    return HostState(
        id=host.id,
        region=host.region,
        pool=Pool.GPU if state_gpus else Pool.GENERAL,
        cpu_milli=round(host.cpus * MILLI_PER_CORE * overcommit.cpu),
        memory_mb=round(host.allocatable_memory_mb * overcommit.memory),
        gpus=state_gpus,
        allow_cpu_machines=allow_cpu_machines,
        claims=tuple(claims),
        fabric_partitions=_fabric(host.id, records, fabric_partitions),
    )


def _fabric(
    host_id: str, records: Sequence[GpuRecord], partitions: Mapping[int, Sequence[int]] | None
) -> tuple[NvlinkPartition, ...] | None:
    """Fabric Manager's partitions by GPU index; one naming a module id no offered GPU has
    is left out (logged)."""
    if partitions is None:
        return None
    index_of = {
        gpu.module_id: index for index, gpu in enumerate(records) if gpu.module_id is not None
    }
    found = []
    for partition_id, modules in sorted(partitions.items()):
        missing = [module for module in modules if module not in index_of]
        if missing:
            log.warning(
                "host %s: Fabric Manager partition %s names modules %s no GPU here reports",
                host_id,
                partition_id,
                missing,
            )
            continue
        found.append(NvlinkPartition(partition_id, tuple(sorted(index_of[m] for m in modules))))
    return tuple(found)


def _mig_layout(record: GpuRecord, before: Gpu | None) -> tuple[str, ...]:
    """The MIG instances the host's NVML reports (the operator's layout; the GPU is then fixed
    in MIG mode); else the layout the host record had, a possibility only (the GPU is not in
    MIG mode now, so it also serves whole)."""
    if record.mig_layout:
        return tuple(record.mig_layout)
    return before.mig_layout if before is not None else ()


def _gpu_state(record: GpuRecord, before: Gpu | None) -> GpuState:
    if not record.available:
        return GpuState.QUARANTINED
    if before is None:
        return GpuState.FREE
    if before.state is GpuState.QUARANTINED and not record.quarantine_reason:
        # Quarantined only for being unfit, and now fit again.
        return GpuState.FREE
    return before.state
