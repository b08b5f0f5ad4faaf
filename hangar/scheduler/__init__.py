"""Placement: filters, fragmentation-aware packing, and the claim protocol.

Pure logic over store snapshots. ``Scheduler.place`` chooses a host with the policy
(``index``) and claims the machine's resources there with one compare-and-set on a
``ClaimStore``; ``dry_run_placements`` and ``capacity_by_region`` answer capacity questions on
a snapshot without claiming anything. A machine asks for whole GPUs, a time share of one GPU
(``gpu_milli``) or a MIG slice (``gpu_slice``, an instance of the GPU's operator-set
``mig_layout``); a GPU serves one of these modes at a time (``GpuMode``).
"""

from hangar.scheduler.capacity import RegionPlacements, capacity_by_region, dry_run_placements
from hangar.scheduler.claims import (
    BatchClaimStore,
    ClaimStore,
    ClaimWrite,
    InMemoryClaimStore,
    VersionedHost,
    compare_and_set_many,
)
from hangar.scheduler.model import (
    MILLI_PER_GPU,
    Claim,
    Gpu,
    GpuMode,
    HostState,
    NvlinkPartition,
    Placement,
    PlacementRequest,
    Pool,
)
from hangar.scheduler.profile import RequestShape, WorkloadProfile
from hangar.scheduler.regions import RegionCatalog
from hangar.scheduler.scheduler import (
    NoPlacementObserver,
    PlacementObserver,
    PlacementOutcome,
    Scheduler,
    SchedulerStats,
    capacity_error,
)

__all__ = [
    "MILLI_PER_GPU",
    "BatchClaimStore",
    "Claim",
    "ClaimStore",
    "ClaimWrite",
    "Gpu",
    "GpuMode",
    "HostState",
    "InMemoryClaimStore",
    "NoPlacementObserver",
    "NvlinkPartition",
    "Placement",
    "PlacementObserver",
    "PlacementOutcome",
    "PlacementRequest",
    "Pool",
    "RegionCatalog",
    "RegionPlacements",
    "RequestShape",
    "Scheduler",
    "SchedulerStats",
    "VersionedHost",
    "WorkloadProfile",
    "capacity_by_region",
    "capacity_error",
    "compare_and_set_many",
    "dry_run_placements",
]
