"""Read-only questions about capacity, answered on a snapshot with the real policy.

``dry_run_placements`` backs ``POST /v1/platform/placements`` and ``capacity_by_region`` backs
``GET /v1/platform/regions?gpu_kind=``. Both place hypothetical machines into a scratch index
built from the snapshot; nothing is claimed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hangar.errors import InvalidRequest
from hangar.scheduler.claims import VersionedHost
from hangar.scheduler.index import PlacementIndex, stable_rank
from hangar.scheduler.model import PlacementRequest
from hangar.scheduler.profile import WorkloadProfile
from hangar.scheduler.regions import RegionCatalog


@dataclass(frozen=True, slots=True)
class RegionPlacements:
    region: str
    requested: int
    placeable: int
    """How many of ``requested`` machines fit in the region right now (at most ``requested``)."""
    host_ids: tuple[str, ...]
    """Where they would go, one entry per machine (a host repeats when it takes several)."""


def dry_run_placements(
    snapshot: Mapping[str, VersionedHost],
    request: PlacementRequest,
    count: int,
    profile: WorkloadProfile | None = None,
    catalog: RegionCatalog | None = None,
) -> list[RegionPlacements]:
    """For each region of the request's expression, in order: how many of ``count`` such
    machines fit and where. Regions are answered independently of each other."""
    if count < 1:
        raise InvalidRequest("count must be at least 1", field="count")
    index = _scratch_index(snapshot, profile)
    regions = (catalog or RegionCatalog()).expand(request.region, index.regions())
    return [
        RegionPlacements(region, count, len(hosts), hosts)
        for region in regions
        for hosts in [_fill(index, request, region, count)]
    ]


def capacity_by_region(
    snapshot: Mapping[str, VersionedHost],
    gpu_kind: str | None,
    template: PlacementRequest | None = None,
    profile: WorkloadProfile | None = None,
) -> dict[str, int]:
    """How many more machines like ``template`` fit in each region of the snapshot. The
    default template is one whole GPU of ``gpu_kind`` (any kind if None) and no CPU or
    memory, i.e. the free GPUs a new machine could have."""
    if template is None:
        kinds = frozenset([gpu_kind]) if gpu_kind else None
        template = PlacementRequest(cpu_milli=0, memory_mb=0, gpus=1, gpu_kinds=kinds)
    if not template.wants_gpu and template.cpu_milli == 0 and template.memory_mb == 0:
        raise InvalidRequest("a capacity template must ask for something", field="template")
    index = _scratch_index(snapshot, profile)
    return {region: len(_fill(index, template, region, None)) for region in sorted(index.regions())}


def _scratch_index(
    snapshot: Mapping[str, VersionedHost], profile: WorkloadProfile | None
) -> PlacementIndex:
    index = PlacementIndex(profile or WorkloadProfile.empty(), stable_rank)
    for record in snapshot.values():
        index.upsert(record.state, record.version)
    return index


def _fill(
    index: PlacementIndex, request: PlacementRequest, region: str, limit: int | None
) -> tuple[str, ...]:
    hosts: list[str] = []
    while limit is None or len(hosts) < limit:
        if request.host_id:
            # A hard constraint (a machine's own host, or its volume's): that host or none.
            choice = index.choose_on(request, request.host_id)
            if choice is not None and choice.state.region != region:
                choice = None
        else:
            choice = index.choose(request, region)
        if choice is None:
            break
        claim = choice.claim(request, f"dry-run-{len(hosts)}")
        index.upsert(choice.state.with_claim(claim), choice.version)
        hosts.append(choice.host_id)
    return tuple(hosts)
