"""Synthetic fleets and request streams (the throughput benchmark and tests), seeded.

Hosts come in a few shapes with NUMA nodes and NVLink partitions, spread over regions, zones
and racks; a few GPUs are quarantined. Requests mix CPU-only machines, GPU shares, and 1-8
whole GPUs of one kind or a set of kinds, in one region, a fallback list or an alias.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hangar.model.gpu import GpuState
from hangar.scheduler.model import Gpu, HostState, PlacementRequest, Pool

REGIONS = ("ord", "iad", "dfw", "sjc", "ams", "fra")
REGION_EXPRESSIONS = ("ord", "iad", "dfw", "sjc", "ams", "fra", "ord,iad", "sjc,dfw", "us", "eu")
ZONES_PER_REGION = 3
RACKS_PER_ZONE = 8
QUARANTINED_FRACTION = 0.005
CPU_MACHINES_ON_GPU_HOSTS = 0.1


@dataclass(frozen=True, slots=True)
class HostShape:
    kind: str
    gpus: int
    partition_size: int
    """GPUs per NVLink partition; 0 when the GPUs have no NVLink."""
    numa_nodes: int
    cpu_milli: int
    memory_mb: int
    weight: float


HOST_SHAPES = (
    HostShape("h100-sxm", 8, 8, 2, 192_000, 2_048_000, 0.08),
    HostShape("a100-sxm4-80gb", 8, 4, 2, 128_000, 1_024_000, 0.10),
    HostShape("l40s", 4, 0, 2, 96_000, 512_000, 0.24),
    HostShape("a10", 2, 0, 1, 48_000, 256_000, 0.22),
    HostShape("", 0, 0, 2, 96_000, 384_000, 0.36),
)


def synthetic_hosts(count: int, seed: int = 0) -> list[HostState]:
    rng = random.Random(f"hosts-{seed}")
    weights = [shape.weight for shape in HOST_SHAPES]
    hosts = []
    for number in range(count):
        shape = rng.choices(HOST_SHAPES, weights)[0]
        region = REGIONS[number % len(REGIONS)]
        zone = f"{region}-{'abc'[rng.randrange(ZONES_PER_REGION)]}"
        gpus = tuple(
            Gpu(
                index=index,
                kind=shape.kind,
                bdf=f"0000:{0x17 + index * 0x10:02x}:00.0",
                numa_node=index * shape.numa_nodes // shape.gpus,
                nvlink_partition=index // shape.partition_size if shape.partition_size else None,
                state=GpuState.QUARANTINED
                if rng.random() < QUARANTINED_FRACTION
                else GpuState.FREE,
            )
            for index in range(shape.gpus)
        )
        hosts.append(
            HostState(
                id=f"host-{number:06d}",
                region=region,
                pool=Pool.GPU if shape.gpus else Pool.GENERAL,
                cpu_milli=shape.cpu_milli,
                memory_mb=shape.memory_mb,
                gpus=gpus,
                zone=zone,
                rack=f"{zone}-r{rng.randrange(RACKS_PER_ZONE)}",
                allow_cpu_machines=bool(shape.gpus) and rng.random() < CPU_MACHINES_ON_GPU_HOSTS,
            )
        )
    return hosts


def synthetic_requests(count: int, seed: int = 0) -> list[PlacementRequest]:
    rng = random.Random(f"requests-{seed}")
    requests = []
    for number in range(count):
        region = rng.choice(REGION_EXPRESSIONS)
        machine_id = f"m-{number:07d}"
        roll = rng.random()
        if roll < 0.66:
            cpus = rng.choice((1, 1, 2, 2, 4, 8))
            requests.append(
                PlacementRequest(
                    cpu_milli=cpus * 1000,
                    memory_mb=cpus * rng.choice((1024, 2048, 4096)),
                    region=region,
                    machine_id=machine_id,
                )
            )
        elif roll < 0.86:
            requests.append(
                PlacementRequest(
                    cpu_milli=rng.choice((1000, 2000, 4000)),
                    memory_mb=rng.choice((4096, 8192, 16384)),
                    gpu_milli=rng.choice((125, 250, 250, 500)),
                    gpu_kinds=frozenset(rng.choice((("l40s",), ("a10",), ("l40s", "a10")))),
                    region=region,
                    machine_id=machine_id,
                )
            )
        else:
            gpus = rng.choices((1, 2, 4, 8), (0.66, 0.2, 0.1, 0.04))[0]
            kinds = rng.choice(
                (("h100-sxm",), ("a100-sxm4-80gb",), ("h100-sxm", "a100-sxm4-80gb"), ("l40s",))
                if gpus > 2
                else (("h100-sxm",), ("a100-sxm4-80gb",), ("l40s",), ("a10",), ("l40s", "a10"))
            )
            requests.append(
                PlacementRequest(
                    cpu_milli=gpus * rng.choice((8000, 12000, 16000)),
                    memory_mb=gpus * rng.choice((32768, 65536)),
                    gpus=gpus,
                    gpu_kinds=frozenset(kinds),
                    region=region,
                    machine_id=machine_id,
                )
            )
    return requests
