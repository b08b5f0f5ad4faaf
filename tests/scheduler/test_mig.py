"""MIG slices in the scheduler's model: layouts, slice claims, one mode per GPU, placement."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hangar.errors import InsufficientCapacity, InvalidRequest
from hangar.model.gpu import GpuState
from hangar.model.gpu_kinds import GPU_KINDS
from hangar.scheduler import (
    Claim,
    GpuMode,
    HostState,
    InMemoryClaimStore,
    PlacementRequest,
    Scheduler,
)
from hangar.scheduler.mig import MIG_PROFILES, check_layout, parse_layout, profile_milli
from hangar.store.host_claims import host_state_from_json, host_state_to_json
from tests.scheduler.fleet import gpu_host, mig_host, share, slice_of, whole

LAYOUT = ("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb")


def test_every_mig_capable_catalog_kind_has_profiles() -> None:
    capable = {kind.name for kind in GPU_KINDS if kind.mig_capable}
    assert capable == set(MIG_PROFILES)


@pytest.mark.parametrize(
    "layout",
    [
        ("7g.80gb",),
        ("1g.10gb",) * 7,
        ("4g.40gb", "3g.40gb"),
        ("3g.40gb", "3g.40gb"),
        LAYOUT,
        ("2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"),
        ("1g.20gb",) * 4,
    ],
)
def test_layouts_that_fit_one_gpu(layout: tuple[str, ...]) -> None:
    check_layout("a100-sxm4-80gb", layout)
    assert sum(profile_milli(name) for name in layout) <= 1000


@pytest.mark.parametrize(
    "layout",
    [
        ("1g.10gb",) * 8,
        ("4g.40gb", "4g.40gb"),
        ("7g.80gb", "1g.10gb"),
        ("3g.40gb", "3g.40gb", "1g.10gb", "1g.10gb"),
        ("1g.20gb",) * 5,
        ("1g.5gb",),
    ],
)
def test_layouts_that_do_not_fit_are_refused(layout: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_layout("a100-sxm4-80gb", layout)
    assert raised.value.fields["field"] == "mig_layout"


def test_kinds_without_mig_take_no_layout() -> None:
    with pytest.raises(InvalidRequest):
        mig_host("l40s-1", kind="l40s", layout=("1g.10gb",))


def test_profiles_and_layout_spelling() -> None:
    assert [profile_milli(f"{n}g.10gb") for n in (1, 2, 3, 4, 7)] == [142, 285, 428, 571, 1000]
    assert parse_layout("1g.10gbx7") == ("1g.10gb",) * 7
    assert parse_layout("3g.40gb+2g.20gb, 1g.10gbx2") == LAYOUT
    assert "1g.18gb" in MIG_PROFILES["h200"]
    for bad in ("5g.10gb", "big", "1g"):
        with pytest.raises(InvalidRequest):
            profile_milli(bad)
    with pytest.raises(InvalidRequest):
        parse_layout(" , ")


def test_slice_claims_put_the_gpu_in_mig_mode_until_all_are_released() -> None:
    host = mig_host("h1", gpus=2, layout=LAYOUT)
    host = host.with_claim(Claim("a", 1000, 1024, (0,), 142, "1g.10gb", 2))
    host = host.with_claim(Claim("b", 1000, 1024, (0,), 428, "3g.40gb", 0))
    assert host.gpu_modes == (GpuMode.MIG, GpuMode.IDLE)
    assert host.gpu_used_milli == (570, 0)
    assert host.free_instances(0) == (1, 3)
    assert host.gpus[0].state is GpuState.FREE
    host = host.without_claim("a")
    assert host.gpu_modes[0] is GpuMode.MIG and host.gpus[0].state is GpuState.FREE
    host = host.without_claim("b")
    assert host.gpu_modes[0] is GpuMode.IDLE
    assert host.gpus[0].state is GpuState.CLEANING, "a GPU whose last slice left is scrubbed"
    assert host.gpus[0].mig_layout == LAYOUT, "the operator's layout stays"


@pytest.mark.parametrize(
    "second",
    [
        Claim("whole", 0, 0, (0,), 1000),
        Claim("share", 0, 0, (0,), 100),
        Claim("same-instance", 0, 0, (0,), 142, "1g.10gb", 2),
        Claim("wrong-profile", 0, 0, (0,), 285, "2g.20gb", 3),
        Claim("no-instance", 0, 0, (0,), 142, "1g.10gb", 9),
        Claim("wrong-milli", 0, 0, (0,), 200, "1g.10gb", 3),
        Claim("two-gpus", 0, 0, (0, 1), 142, "1g.10gb", 3),
        Claim("no-layout", 0, 0, (2,), 142, "1g.10gb", 0),
    ],
)
def test_a_gpu_is_never_in_two_modes_and_an_instance_has_one_holder(second: Claim) -> None:
    host = mig_host("h1", gpus=2, layout=LAYOUT, plain=1)
    host = host.with_claim(Claim("first", 0, 0, (0,), 142, "1g.10gb", 2))
    with pytest.raises(InvalidRequest):
        host.with_claim(second)


def test_a_shared_gpu_takes_no_slice_and_a_whole_gpu_nothing_else() -> None:
    host = mig_host("h1", gpus=2, layout=LAYOUT)
    host = host.with_claim(Claim("s", 0, 0, (0,), 300)).with_claim(Claim("w", 0, 0, (1,), 1000))
    assert host.gpu_modes == (GpuMode.SHARED, GpuMode.WHOLE)
    assert host.free_instances(0) == () and host.free_instances(1) == ()
    with pytest.raises(InvalidRequest):
        host.with_claim(Claim("x", 0, 0, (0,), 142, "1g.10gb", 2))
    with pytest.raises(InvalidRequest):
        host.with_claim(Claim("y", 0, 0, (1,), 142, "1g.10gb", 2))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"gpu_slice": "1g.10gb", "gpus": 1}, "gpu_slice"),
        ({"gpu_slice": "1g.10gb", "gpu_milli": 100}, "gpu_slice"),
        ({"gpu_slice": "9g.10gb"}, "gpu_slice"),
        ({"gpu_slice": "1g.10gb", "gpu_kinds": frozenset({"l40s"})}, "gpu_slice"),
    ],
)
def test_slice_requests_are_validated(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        PlacementRequest(cpu_milli=0, memory_mb=0, **fields)  # type: ignore[arg-type]
    assert raised.value.fields["field"] == field


def test_slice_demand_is_its_profiles_share() -> None:
    request = slice_of("m", "3g.40gb")
    assert request.gpu_demand_milli == 428 and request.wants_gpu


def test_slices_pack_cut_gpus_before_cutting_another() -> None:
    store = InMemoryClaimStore([mig_host("mig-1", gpus=2, layout=("1g.10gb",) * 7)])
    scheduler = Scheduler(store)
    placements = [scheduler.place(slice_of(f"s{n}", "1g.10gb")) for n in range(9)]
    gpus = [p.claim.gpu_indexes[0] for p in placements]
    assert gpus == [0] * 7 + [1] * 2
    assert len({(p.claim.gpu_indexes, p.claim.mig_instance) for p in placements}) == 9
    with pytest.raises(InsufficientCapacity) as raised:
        scheduler.place(slice_of("big", "7g.80gb"))
    assert "7g.80gb" in raised.value.message


def test_whole_gpus_and_shares_leave_mig_gpus_for_slices() -> None:
    store = InMemoryClaimStore([mig_host("h1", gpus=4, layout=LAYOUT, plain=2)])
    scheduler = Scheduler(store)
    first = scheduler.place(whole("w", 1))
    second = scheduler.place(share("s", 400))
    assert first.claim.gpu_indexes == (2,)
    assert second.claim.gpu_indexes == (3,)
    cut = scheduler.place(slice_of("m", "2g.20gb"))
    assert cut.claim.gpu_indexes[0] in (0, 1) and cut.claim.gpu_slice == "2g.20gb"
    assert cut.claim.mig_instance == 1
    more = scheduler.place(whole("w2", 1))
    assert more.claim.gpu_indexes[0] in (0, 1) and more.claim.gpu_indexes != cut.claim.gpu_indexes


def test_a_slice_can_not_land_on_a_gpu_used_whole_or_shared() -> None:
    host = mig_host("h1", gpus=1, layout=LAYOUT)
    store = InMemoryClaimStore([host])
    scheduler = Scheduler(store)
    scheduler.place(share("s", 100))
    with pytest.raises(InsufficientCapacity):
        scheduler.place(slice_of("m", "1g.10gb"))


def test_released_slices_free_the_gpu_for_whole_use_after_the_handoff() -> None:
    store = InMemoryClaimStore([mig_host("h1", gpus=1, layout=LAYOUT)])
    scheduler = Scheduler(store)
    held = [scheduler.place(slice_of(f"m{n}", "1g.10gb")) for n in range(2)]
    with pytest.raises(InsufficientCapacity):
        scheduler.place(whole("w", 1))
    for placement in held:
        scheduler.release(placement.host_id, placement.claim.machine_id)
    record = store.read_host("h1")
    assert record is not None and record.state.gpus[0].state is GpuState.CLEANING
    assert store.compare_and_set(
        "h1", record.version, record.state.with_gpu_state(0, GpuState.FREE)
    )
    scheduler.refresh()
    assert scheduler.place(whole("w", 1)).claim.gpu_indexes == (0,)


def test_slice_requests_name_acceptable_kinds() -> None:
    hosts = [mig_host("a100", gpus=1, layout=LAYOUT), mig_host("h100", kind="h100-sxm", gpus=1)]
    scheduler = Scheduler(InMemoryClaimStore(hosts))
    placement = scheduler.place(slice_of("m", "1g.10gb", kinds=("h100-sxm",)))
    assert placement.host_id == "h100"


def test_a_slice_bound_to_a_host_takes_an_instance_there_or_nowhere() -> None:
    hosts = [mig_host("cut", gpus=1, layout=LAYOUT), gpu_host("plain", gpus=1)]
    scheduler = Scheduler(InMemoryClaimStore(hosts))
    first = scheduler.place(replace(slice_of("m1", "1g.10gb"), host_id="cut"))
    second = scheduler.place(replace(slice_of("m2", "1g.10gb"), host_id="cut"))
    assert (first.host_id, first.claim.gpu_slice) == ("cut", "1g.10gb")
    assert {first.claim.mig_instance, second.claim.mig_instance} == {2, 3}
    with pytest.raises(InsufficientCapacity):
        scheduler.place(replace(slice_of("m3", "1g.10gb"), host_id="cut"))  # both taken
    with pytest.raises(InsufficientCapacity):
        scheduler.place(replace(slice_of("m4", "1g.10gb"), host_id="plain"))  # no layout


def test_host_state_with_slices_round_trips_through_json() -> None:
    host = mig_host("h1", gpus=2, layout=LAYOUT, plain=1)
    host = host.with_claim(Claim("m", 1000, 512, (0,), 428, "3g.40gb", 0))
    host = host.with_claim(Claim("w", 1000, 512, (1,), 1000))
    assert host_state_from_json(host_state_to_json(host)) == host


def test_json_written_before_slices_still_reads() -> None:
    old = {
        "id": "h1",
        "region": "ord",
        "pool": "gpu",
        "cpu_milli": 8000,
        "memory_mb": 8192,
        "zone": "",
        "rack": "",
        "allow_cpu_machines": False,
        "gpus": [[0, "l40s", "0000:01:00.0", 0, None, "claimed"]],
        "claims": [["m1", 1000, 512, [0], 1000]],
    }
    host = host_state_from_json(json.dumps(old))
    assert host.gpus[0].mig_layout == () and host.claims[0].gpu_slice == ""
    assert host.gpu_modes == (GpuMode.WHOLE,)
    # written back: today's fields (IOMMU group, fabric partitions), nothing of MIG
    current = {**old, "gpus": [[*old["gpus"][0], None]], "fabric_partitions": None}
    assert json.loads(host_state_to_json(host)) == current


def test_plain_hosts_are_unchanged_by_mig() -> None:
    host = gpu_host("h1", gpus=2)
    assert isinstance(host, HostState) and all(not gpu.mig_layout for gpu in host.gpus)
    assert host.free_instances(0) == ()
