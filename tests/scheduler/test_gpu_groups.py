"""IOMMU groups and Fabric Manager partitions in placement: a group's GPUs are claimed all
together or not at all, several NVSwitch GPUs only as one partition, and both survive the
SQLite claim store."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hangar.errors import InsufficientCapacity, InvalidRequest
from hangar.model.gpu import GpuRecord, GpuState
from hangar.model.host import HostInfo
from hangar.scheduler import (
    Claim,
    Gpu,
    HostState,
    InMemoryClaimStore,
    NvlinkPartition,
    Pool,
    Scheduler,
)
from hangar.scheduler.index import pick_whole_gpus
from hangar.scheduler.machines import host_state
from hangar.store.host_claims import SqliteClaimStore, host_state_from_json, host_state_to_json
from tests.scheduler.fleet import whole

# The HGX board of tests/devices: GPUs by PCI address carry these module ids, and Fabric
# Manager's partitions name modules (8, 4+4, 2+2+2+2, and each alone).
HGX_MODULES = [1, 3, 2, 4, 7, 5, 8, 6]
HGX_PARTITIONS = {
    0: [1, 2, 3, 4, 5, 6, 7, 8],
    1: [1, 2, 3, 4],
    2: [5, 6, 7, 8],
    3: [1, 2],
    4: [3, 4],
    5: [5, 6],
    6: [7, 8],
    **{6 + module: [module] for module in range(1, 9)},
}


def grouped_host(groups: list[int | None], numa: list[int] | None = None) -> HostState:
    """GPUs with these IOMMU groups (None: a group of its own)."""
    return HostState(
        id="h1",
        region="ord",
        pool=Pool.GPU,
        cpu_milli=256_000,
        memory_mb=1024 * 1024,
        gpus=tuple(
            Gpu(
                index,
                "l40s",
                f"0000:{index + 1:02x}:00.0",
                numa[index] if numa else 0,
                iommu_group=group,
            )
            for index, group in enumerate(groups)
        ),
    )


def hgx_state(partitions: dict[int, list[int]] | None = HGX_PARTITIONS) -> HostState:
    records = [
        GpuRecord(
            host_id="hgx",
            bdf=f"0000:{bus:02x}:00.0",
            kind="h100-sxm",
            numa_node=position // 4,
            nvlink_domain="board-0",
            iommu_group=13 + 4 * position,
            module_id=module,
        )
        for position, (bus, module) in enumerate(
            zip([0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB], HGX_MODULES, strict=True)
        )
    ]
    info = HostInfo(id="hgx", region="ord", cpus=112, memory_mb=2048 * 1024)
    return host_state(info, records, fabric_partitions=partitions)


def modules_of(state: HostState, indexes: tuple[int, ...]) -> list[int]:
    return sorted(HGX_MODULES[index] for index in indexes)


def test_a_group_of_two_is_picked_whole_and_never_split() -> None:
    state = grouped_host([7, 7, None, None])

    assert pick_whole_gpus(state, 2) == (0, 1), "the pair, keeping the single GPUs whole"
    assert pick_whole_gpus(state, 1) == (2,)
    assert pick_whole_gpus(state, 3) == (0, 1, 2)
    taken = state.with_claim(Claim("m1", 1000, 1024, (2, 3), 1000))
    with pytest.raises(ValueError, match="no 1 unused GPUs"):
        pick_whole_gpus(taken, 1)
    assert pick_whole_gpus(taken, 2) == (0, 1)


def test_a_claim_that_splits_a_group_cannot_be_written() -> None:
    state = grouped_host([7, 7, None, None])

    with pytest.raises(InvalidRequest, match="splits an IOMMU group"):
        state.with_claim(Claim("m1", 1000, 1024, (0,), 1000))


def test_the_scheduler_refuses_half_a_group_and_releases_it_whole() -> None:
    store = InMemoryClaimStore([grouped_host([7, 7])])
    scheduler = Scheduler(store)

    with pytest.raises(InsufficientCapacity):
        scheduler.place(whole("half", 1))
    placement = scheduler.place(whole("both", 2))
    assert placement.claim.gpu_indexes == (0, 1)
    scheduler.release("h1", "both")
    record = store.read_host("h1")
    assert record is not None
    assert [gpu.state for gpu in record.state.gpus] == [GpuState.CLEANING] * 2
    assert record.state.group_indexes(1) == (0, 1)


def test_several_nvswitch_gpus_are_claimed_as_one_partition_packed() -> None:
    state = hgx_state()

    first = pick_whole_gpus(state, 2)
    assert modules_of(state, first) == [1, 2], "modules 1 and 2, not PCI neighbours 1 and 3"
    state = state.with_claim(Claim("m1", 1000, 1024, first, 1000))
    second = pick_whole_gpus(state, 2)
    assert modules_of(state, second) == [3, 4], "fills the half-used four-GPU partition"
    assert state.partition_of(second) is not None
    assert state.partition_of(second).partition_id == 4  # type: ignore[union-attr]
    four = pick_whole_gpus(state, 4)
    assert modules_of(state, four) == [5, 6, 7, 8]
    with pytest.raises(ValueError):
        pick_whole_gpus(state, 3)  # Fabric Manager has no partition of three


def test_a_fabric_whose_partitions_are_unknown_takes_single_gpus_only() -> None:
    store = InMemoryClaimStore([hgx_state(partitions={})])
    scheduler = Scheduler(store)

    with pytest.raises(InsufficientCapacity):
        scheduler.place(whole("pair", 2, cpu=1, memory_gb=1))
    assert len(scheduler.place(whole("lone", 1, cpu=1, memory_gb=1)).claim.gpu_indexes) == 1


def test_partitions_naming_modules_the_host_lacks_are_left_out() -> None:
    state = hgx_state({3: [1, 2], 20: [1, 9]})

    assert state.fabric_partitions == (NvlinkPartition(3, (0, 2)),)
    assert [gpu.iommu_group for gpu in state.gpus][:2] == [13, 17]


def test_groups_and_partitions_survive_the_sqlite_claim_store(tmp_path: Path) -> None:
    state = hgx_state().with_claim(Claim("m1", 1000, 1024, (0, 2), 1000))
    store = SqliteClaimStore(tmp_path / "claims.db")
    store.put_host(state)

    record = store.read_host("hgx")

    assert record is not None and record.state == state
    older = json.loads(host_state_to_json(grouped_host([None, None])))
    older["gpus"] = [gpu[:6] for gpu in older["gpus"]]
    del older["fabric_partitions"]
    assert host_state_from_json(json.dumps(older)) == grouped_host([None, None])


LAYOUTS = st.lists(st.sampled_from([None, 1, 2, 3]), min_size=1, max_size=8)


def _fits(state: HostState, count: int) -> bool:
    """Brute force: some set of whole free groups adds up to ``count``."""
    units = {state.group_indexes(gpu.index) for gpu in state.gpus}
    free = [
        unit
        for unit in units
        if all(state.gpus[i].state is GpuState.FREE and not state.gpu_used_milli[i] for i in unit)
    ]
    return any(
        sum(len(unit) for unit in chosen) == count
        for size in range(len(free) + 1)
        for chosen in itertools.combinations(free, size)
    )


@settings(max_examples=60, deadline=None)
@given(
    layout=LAYOUTS,
    operations=st.lists(st.tuples(st.booleans(), st.integers(1, 8)), max_size=12),
)
def test_no_sequence_of_claims_splits_a_group_or_refuses_a_fit(
    layout: list[int | None], operations: list[tuple[bool, int]]
) -> None:
    store = InMemoryClaimStore([grouped_host(layout)])
    scheduler = Scheduler(store)
    placed: list[str] = []
    for number, (place, count) in enumerate(operations):
        record = store.read_host("h1")
        assert record is not None
        if not place and placed:
            scheduler.release("h1", placed.pop(0))
            continue
        request = whole(f"m{number}", count, cpu=1, memory_gb=1)
        try:
            claim = scheduler.place(request).claim
        except InsufficientCapacity:
            assert not _fits(record.state, count)
            continue
        placed.append(claim.machine_id)
        state = record.state
        assert len(claim.gpu_indexes) == count
        for index in claim.gpu_indexes:
            assert set(state.group_indexes(index)) <= set(claim.gpu_indexes)
