"""Small hand-built fleets for scheduler tests."""

from __future__ import annotations

from dataclasses import replace

from hangar.model.gpu import GpuState
from hangar.scheduler import Gpu, HostState, PlacementRequest, Pool


def gpu_host(
    host_id: str,
    kind: str = "a100-sxm4-80gb",
    gpus: int = 8,
    region: str = "ord",
    cpu: int = 128,
    memory_gb: int = 1024,
    partition_size: int = 0,
    numa_nodes: int = 1,
    zone: str = "",
    allow_cpu_machines: bool = False,
    states: dict[int, GpuState] | None = None,
) -> HostState:
    states = states or {}
    return HostState(
        id=host_id,
        region=region,
        pool=Pool.GPU,
        cpu_milli=cpu * 1000,
        memory_mb=memory_gb * 1024,
        gpus=tuple(
            Gpu(
                index=index,
                kind=kind,
                bdf=f"0000:{index + 1:02x}:00.0",
                numa_node=index * numa_nodes // gpus,
                nvlink_partition=index // partition_size if partition_size else None,
                state=states.get(index, GpuState.FREE),
            )
            for index in range(gpus)
        ),
        zone=zone,
        allow_cpu_machines=allow_cpu_machines,
    )


def mig_host(
    host_id: str,
    kind: str = "a100-sxm4-80gb",
    gpus: int = 2,
    layout: tuple[str, ...] = ("1g.10gb",) * 7,
    plain: int = 0,
    region: str = "ord",
    cpu: int = 64,
    memory_gb: int = 512,
    fixed: bool = False,
) -> HostState:
    """A GPU host whose first ``gpus - plain`` GPUs the operator set up for MIG ``layout``:
    in MIG mode for good when ``fixed`` (a real host's), else cut only while slices are held
    (the simulations')."""
    host = gpu_host(host_id, kind=kind, gpus=gpus, region=region, cpu=cpu, memory_gb=memory_gb)
    return replace(
        host,
        gpus=tuple(
            replace(gpu, mig_layout=layout, mig_fixed=fixed) if gpu.index < gpus - plain else gpu
            for gpu in host.gpus
        ),
    )


def general_host(
    host_id: str, region: str = "ord", cpu: int = 64, memory_gb: int = 256
) -> HostState:
    return HostState(
        id=host_id,
        region=region,
        pool=Pool.GENERAL,
        cpu_milli=cpu * 1000,
        memory_mb=memory_gb * 1024,
    )


def whole(
    machine_id: str,
    gpus: int = 1,
    kinds: tuple[str, ...] | None = None,
    region: str = "",
    cpu: int = 8,
    memory_gb: int = 32,
    zone: str | None = None,
) -> PlacementRequest:
    return PlacementRequest(
        cpu_milli=cpu * 1000,
        memory_mb=memory_gb * 1024,
        gpus=gpus,
        gpu_kinds=frozenset(kinds) if kinds else None,
        region=region,
        zone=zone,
        machine_id=machine_id,
    )


def share(
    machine_id: str,
    milli: int,
    kinds: tuple[str, ...] | None = None,
    region: str = "",
    cpu: int = 2,
    memory_gb: int = 8,
) -> PlacementRequest:
    return PlacementRequest(
        cpu_milli=cpu * 1000,
        memory_mb=memory_gb * 1024,
        gpu_milli=milli,
        gpu_kinds=frozenset(kinds) if kinds else None,
        region=region,
        machine_id=machine_id,
    )


def cpu_only(
    machine_id: str, cpu: int = 2, memory_gb: int = 4, region: str = ""
) -> PlacementRequest:
    return PlacementRequest(
        cpu_milli=cpu * 1000, memory_mb=memory_gb * 1024, region=region, machine_id=machine_id
    )


def slice_of(
    machine_id: str,
    profile: str,
    kinds: tuple[str, ...] | None = None,
    region: str = "",
    cpu: int = 2,
    memory_gb: int = 8,
) -> PlacementRequest:
    return PlacementRequest(
        cpu_milli=cpu * 1000,
        memory_mb=memory_gb * 1024,
        gpu_kinds=frozenset(kinds) if kinds else None,
        region=region,
        machine_id=machine_id,
        gpu_slice=profile,
    )
