"""GPUs fixed in MIG mode (a real host's, from the layout its NVML reports): they serve slices
of their layout only, never a whole-GPU or shared machine, and placement says so; a layout in
a simulation stays a possibility the packer may use whole or cut."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hangar.errors import InsufficientCapacity, InvalidRequest
from hangar.model.gpu import GpuRecord, GpuState
from hangar.model.host import HostInfo
from hangar.scheduler import (
    Claim,
    Gpu,
    GpuMode,
    HostState,
    InMemoryClaimStore,
    PlacementRequest,
    Pool,
    Scheduler,
    capacity_by_region,
)
from hangar.scheduler.index import PlacementIndex
from hangar.scheduler.machines import host_state
from hangar.scheduler.profile import WorkloadProfile
from hangar.store.host_claims import SqliteClaimStore, host_state_from_json, host_state_to_json
from tests.scheduler.fleet import mig_host, share, slice_of, whole

LAYOUT = ("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb")
HOST = HostInfo(id="h1", region="ord", cpus=32, memory_mb=512 * 1024)
MIG_BDF = "0000:02:00.0"


def records(
    mig: dict[str, list[str]], bdfs: tuple[str, ...] = ("0000:01:00.0", MIG_BDF)
) -> list[GpuRecord]:
    """The host's GPU records as the agent registers them: MIG on where ``mig`` has a layout."""
    return [
        GpuRecord(
            host_id=HOST.id,
            bdf=bdf,
            kind="a100-sxm4-80gb",
            iommu_group=10 + n,
            mig_layout=mig.get(bdf, []),
        )
        for n, bdf in enumerate(bdfs)
    ]


def bound(request: PlacementRequest, host_id: str = "h1") -> PlacementRequest:
    return replace(request, host_id=host_id)


def test_a_record_in_mig_mode_makes_a_fixed_gpu_and_a_remembered_layout_does_not() -> None:
    state = host_state(HOST, records({MIG_BDF: list(LAYOUT)}))
    plain, cut = state.gpus
    assert (plain.mig_layout, plain.mig_fixed) == ((), False)
    assert (cut.mig_layout, cut.mig_fixed) == (LAYOUT, True)
    # MIG mode off now: the layout the host record had stays a possibility, not a mode.
    again = host_state(HOST, records({}), previous=state)
    assert again.gpus[1].mig_layout == LAYOUT and not again.gpus[1].mig_fixed


def test_a_host_whose_only_free_gpu_is_in_mig_mode_refuses_whole_and_takes_a_slice(
    tmp_path: Path,
) -> None:
    store = SqliteClaimStore(tmp_path / "claims.sqlite")
    try:
        store.put_host(host_state(HOST, records({MIG_BDF: list(LAYOUT)})))
        scheduler = Scheduler(store)
        first = scheduler.place(bound(whole("w1", cpu=2, memory_gb=8)))
        assert first.claim.gpu_indexes == (0,), "the mixed host gives the plain GPU whole"

        with pytest.raises(InsufficientCapacity) as raised:
            scheduler.place(bound(whole("w2", cpu=2, memory_gb=8)))
        error = raised.value
        assert "1x any-kind GPU" in error.message
        assert "0 whole GPU(s)" in error.message and f"slices only: {MIG_BDF}" in error.message
        assert error.fields["free_gpus"] == 0
        assert error.fields["mig_mode_gpus"] == [MIG_BDF]
        assert error.fields["free_mig_instances"] == {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}
        with pytest.raises(InsufficientCapacity):
            scheduler.place(bound(share("s", 300)))
        with pytest.raises(InsufficientCapacity):
            scheduler.place(whole("w3", cpu=2, memory_gb=8))  # region-wide: the same
        with pytest.raises(InsufficientCapacity, match=r"7g\.80gb"):
            scheduler.place(bound(slice_of("big", "7g.80gb")))  # not of its layout

        cut = scheduler.place(bound(slice_of("m", "2g.20gb")))
        assert (cut.claim.gpu_indexes, cut.claim.mig_instance) == ((1,), 1)
        record = store.read_host("h1")
        assert record is not None
        assert record.state.gpus[1].mig_fixed, "the flag survives the store's write"
        assert record.state.gpu_modes == (GpuMode.WHOLE, GpuMode.MIG)
        assert store.snapshot()["h1"].state == record.state
    finally:
        store.close()


def test_released_slices_leave_a_fixed_gpu_for_slices_only() -> None:
    host = mig_host("h1", gpus=1, layout=LAYOUT, fixed=True)
    store = InMemoryClaimStore([host])
    scheduler = Scheduler(store)
    held = scheduler.place(slice_of("m", "1g.10gb"))
    scheduler.release(held.host_id, "m")
    record = store.read_host("h1")
    assert record is not None and record.state.gpus[0].state is GpuState.CLEANING
    assert store.compare_and_set(
        "h1", record.version, record.state.with_gpu_state(0, GpuState.FREE)
    )
    scheduler.refresh()
    with pytest.raises(InsufficientCapacity):
        scheduler.place(whole("w", 1))
    assert scheduler.place(slice_of("m2", "3g.40gb")).claim.mig_instance == 0


@pytest.mark.parametrize("fixed", [False, True])
def test_a_layout_in_a_simulation_is_a_possibility_and_a_fixed_one_a_mode(fixed: bool) -> None:
    store = InMemoryClaimStore([mig_host("h1", gpus=3, layout=LAYOUT, plain=1, fixed=fixed)])
    scheduler = Scheduler(store)
    assert scheduler.place(whole("w1")).claim.gpu_indexes == (2,), "the plain GPU first"
    if fixed:
        for refused in (whole("w2"), share("s", 400)):
            with pytest.raises(InsufficientCapacity):
                scheduler.place(refused)
    else:
        assert scheduler.place(whole("w2")).claim.gpu_indexes == (0,)
        assert scheduler.place(share("s", 400)).claim.gpu_indexes == (1,)
    if fixed:
        assert scheduler.place(slice_of("m", "3g.40gb")).claim.gpu_indexes == (0,)
    else:
        with pytest.raises(InsufficientCapacity):
            scheduler.place(slice_of("m", "3g.40gb"))  # both cuttable GPUs are in use


def test_an_idle_fixed_gpu_is_open_and_slices_pack_the_one_already_used() -> None:
    host = mig_host("h1", gpus=2, layout=LAYOUT, fixed=True)
    host = host.with_claim(Claim("held", 1000, 1024, (1,), 142, "1g.10gb", 2))
    index = PlacementIndex(WorkloadProfile.empty())
    entry = index.upsert(host, 1)
    assert entry.whole_free == 0 and entry.gaps == {} and entry.fresh_slices == {}
    assert entry.open_slices == {"3g.40gb": (1, 0), "2g.20gb": (1, 1), "1g.10gb": (1, 3)}
    assert entry.free_gpu_milli == 2 * 428 + 2 * 285 + 142 * 3
    scheduler = Scheduler(InMemoryClaimStore([host]))
    assert scheduler.place(slice_of("m", "1g.10gb")).claim.gpu_indexes == (1,)
    assert scheduler.place(slice_of("m2", "1g.10gb")).claim.gpu_indexes == (0,)


def test_fixed_gpus_are_not_counted_as_whole_free() -> None:
    hosts = [mig_host("cut", gpus=2, layout=LAYOUT, plain=1, fixed=True)]
    hosts.append(mig_host("maybe", gpus=2, layout=LAYOUT, plain=1))
    store = InMemoryClaimStore(hosts)
    index = PlacementIndex(WorkloadProfile.empty())
    assert index.upsert(hosts[0], 1).whole_free == 1
    assert index.upsert(hosts[1], 1).whole_free == 2
    assert hosts[0].whole_free_indexes() == (1,)
    assert capacity_by_region(store.snapshot(), None) == {"ord": 3}
    template = slice_of("t", "1g.10gb")
    assert capacity_by_region(store.snapshot(), None, template) == {"ord": 4}


def test_an_iommu_group_with_a_fixed_gpu_is_never_claimed_whole() -> None:
    gpus = tuple(Gpu(i, "a100-sxm4-80gb", f"0000:0{i + 1}:00.0", iommu_group=7) for i in range(2))
    gpus = (gpus[0], replace(gpus[1], mig_layout=LAYOUT, mig_fixed=True))
    host = HostState("h1", "ord", Pool.GPU, 64_000, 512 * 1024, gpus=gpus)
    scheduler = Scheduler(InMemoryClaimStore([host]))
    for count in (1, 2):
        with pytest.raises(InsufficientCapacity):
            scheduler.place(whole(f"w{count}", count))
    assert scheduler.place(slice_of("m", "1g.10gb")).claim.gpu_indexes == (1,)


@pytest.mark.parametrize(
    "claim",
    [Claim("whole", 0, 0, (0,), 1000), Claim("share", 0, 0, (0,), 300)],
)
def test_a_fixed_gpu_takes_no_whole_or_shared_claim(claim: Claim) -> None:
    host = mig_host("h1", gpus=1, layout=LAYOUT, fixed=True)
    with pytest.raises(InvalidRequest, match="in MIG mode"):
        host.with_claim(claim)


def test_a_gpu_fixed_in_mig_mode_needs_a_layout() -> None:
    with pytest.raises(InvalidRequest, match="without a layout"):
        HostState(
            "h1",
            "ord",
            Pool.GPU,
            1000,
            1024,
            gpus=(Gpu(0, "a100-sxm4-80gb", "0000:01:00.0", mig_fixed=True),),
        )


def test_the_flag_round_trips_and_older_records_read_as_not_fixed() -> None:
    host = mig_host("h1", gpus=2, layout=LAYOUT, plain=1, fixed=True)
    host = host.with_claim(Claim("m", 1000, 512, (0,), 428, "3g.40gb", 0))
    written = json.loads(host_state_to_json(host))
    assert written["gpus"][0][-2:] == [list(LAYOUT), True]
    assert len(written["gpus"][1]) == 7, "a plain GPU is written as before"
    assert host_state_from_json(host_state_to_json(host)) == host
    written["gpus"][0] = written["gpus"][0][:-1]  # as written before the flag
    older = host_state_from_json(json.dumps(written))
    assert older.gpus[0].mig_layout == LAYOUT and not older.gpus[0].mig_fixed
