from __future__ import annotations

import pytest

from hangar.errors import InvalidRequest
from hangar.model.gpu import GpuState
from hangar.scheduler import (
    InMemoryClaimStore,
    PlacementRequest,
    RegionCatalog,
    Scheduler,
    capacity_by_region,
    dry_run_placements,
)
from tests.scheduler.fleet import general_host, gpu_host, whole

CATALOG = RegionCatalog({"us": ("ord", "iad")})


def store() -> InMemoryClaimStore:
    return InMemoryClaimStore(
        [
            gpu_host("ord-1", kind="l40s", gpus=4, region="ord", states={0: GpuState.CLEANING}),
            gpu_host("ord-2", kind="a10", gpus=2, region="ord"),
            gpu_host("iad-3", kind="l40s", gpus=4, region="iad", partition_size=2),
            general_host("iad-4", region="iad"),
        ]
    )


def test_dry_run_answers_per_region_in_order_and_claims_nothing() -> None:
    claims = store()
    before = claims.snapshot()
    results = dry_run_placements(
        before, whole("", gpus=2, kinds=("l40s",), region="iad,ord"), count=3, catalog=CATALOG
    )
    assert [(r.region, r.requested, r.placeable) for r in results] == [("iad", 3, 2), ("ord", 3, 1)]
    assert results[0].host_ids == ("iad-3", "iad-3")
    assert claims.snapshot() == before


def test_dry_run_matches_what_the_scheduler_then_does() -> None:
    claims = store()
    planned = dry_run_placements(claims.snapshot(), whole("", kinds=("l40s",), region="ord"), 3)
    scheduler = Scheduler(claims)
    done = [
        scheduler.place(whole(f"m{n}", kinds=("l40s",), region="ord")).host_id for n in range(3)
    ]
    assert list(planned[0].host_ids) == done


def test_capacity_by_region_counts_free_gpus_of_a_kind() -> None:
    snapshot = store().snapshot()
    assert capacity_by_region(snapshot, "l40s") == {"iad": 4, "ord": 3}
    assert capacity_by_region(snapshot, "a10") == {"iad": 0, "ord": 2}
    assert capacity_by_region(snapshot, None) == {"iad": 4, "ord": 5}


def test_capacity_by_region_for_a_machine_shape() -> None:
    snapshot = store().snapshot()
    big = PlacementRequest(cpu_milli=60_000, memory_mb=1024, gpus=2, gpu_kinds=frozenset({"l40s"}))
    assert capacity_by_region(snapshot, "l40s", big) == {"iad": 2, "ord": 1}


def test_capacity_questions_must_ask_for_something() -> None:
    with pytest.raises(InvalidRequest):
        capacity_by_region(store().snapshot(), None, PlacementRequest(cpu_milli=0, memory_mb=0))
    with pytest.raises(InvalidRequest):
        dry_run_placements(store().snapshot(), whole(""), count=0)


def test_a_dry_run_bound_to_a_host_places_there_or_nowhere() -> None:
    """A machine with a volume may run only on the volume's host: the dry run the API asks
    at create holds to it as the scheduler's ``place`` does."""
    snapshot = store().snapshot()
    on_ord_1 = PlacementRequest(
        cpu_milli=8000, memory_mb=1024, gpus=1, region="ord", host_id="ord-1"
    )
    [result] = dry_run_placements(snapshot, on_ord_1, count=5)
    assert result.host_ids == ("ord-1",) * 3, "its three free GPUs, never ord-2's"
    elsewhere = PlacementRequest(
        cpu_milli=8000, memory_mb=1024, gpus=1, region="iad", host_id="ord-1"
    )
    assert dry_run_placements(snapshot, elsewhere, count=1)[0].placeable == 0
    cpu_only = PlacementRequest(cpu_milli=1000, memory_mb=1024, region="iad", host_id="iad-4")
    assert dry_run_placements(snapshot, cpu_only, count=2)[0].host_ids == ("iad-4", "iad-4")
