"""Filters and policy, through the real scheduler and an in-memory claim store."""

from __future__ import annotations

import pytest

from hangar.errors import InsufficientCapacity, InvalidRequest
from hangar.model.gpu import GpuState
from hangar.scheduler import (
    Claim,
    Gpu,
    HostState,
    InMemoryClaimStore,
    PlacementRequest,
    Pool,
    RegionCatalog,
    Scheduler,
    WorkloadProfile,
)
from hangar.scheduler.index import pick_whole_gpus
from tests.scheduler.fleet import cpu_only, general_host, gpu_host, share, whole


def scheduler(*hosts: HostState, profile: WorkloadProfile | None = None) -> Scheduler:
    return Scheduler(
        InMemoryClaimStore(hosts),
        profile,
        RegionCatalog({"us": ("iad", "ord", "sjc")}),
        rank_of=lambda host_id: int(host_id.rsplit("-", 1)[1]),
    )


# -- pools ---------------------------------------------------------------------------------


def test_gpu_machines_go_only_to_gpu_hosts() -> None:
    sched = scheduler(general_host("cpu-1", cpu=512), gpu_host("gpu-2", gpus=1))
    assert sched.place(whole("m1")).host_id == "gpu-2"
    with pytest.raises(InsufficientCapacity):
        sched.place(whole("m2"))


def test_cpu_machines_stay_off_gpu_hosts_unless_the_operator_allows_it() -> None:
    with pytest.raises(InsufficientCapacity):
        scheduler(gpu_host("gpu-1")).place(cpu_only("m1"))
    assert scheduler(gpu_host("gpu-1"), general_host("cpu-2")).place(cpu_only("m1")).host_id == (
        "cpu-2"
    )
    allowed = gpu_host("gpu-1", allow_cpu_machines=True)
    assert scheduler(allowed).place(cpu_only("m1")).host_id == "gpu-1"


# -- regions, kinds, zones -----------------------------------------------------------------


def test_regions_are_tried_in_the_order_given() -> None:
    sched = scheduler(gpu_host("ord-1", gpus=1, region="ord"), gpu_host("iad-2", region="iad"))
    assert sched.place(whole("m1", region="ord,iad")).host_id == "ord-1"
    assert sched.place(whole("m2", region="ord,iad")).host_id == "iad-2"
    assert sched.place(whole("m3", region="us")).region == "iad"


def test_a_kind_set_accepts_any_of_its_kinds_and_nothing_else() -> None:
    sched = scheduler(gpu_host("h100-1", kind="h100", gpus=1), gpu_host("l40s-2", kind="l40s"))
    assert sched.place(whole("m1", kinds=("h100",))).host_id == "h100-1"
    with pytest.raises(InsufficientCapacity):
        sched.place(whole("m2", kinds=("h100", "a10")))
    assert sched.place(whole("m3", kinds=("h100", "l40s"))).host_id == "l40s-2"


def test_flexible_requests_leave_kinds_others_cannot_do_without() -> None:
    demand = [whole(f"a{n}", kinds=("a10",)) for n in range(8)] + [whole("f", kinds=None)]
    sched = scheduler(
        gpu_host("a10-1", kind="a10", gpus=8),
        gpu_host("l40s-2", kind="l40s", gpus=8),
        profile=WorkloadProfile.from_requests(demand),
    )
    assert sched.place(whole("m1", kinds=("a10", "l40s"))).host_id == "l40s-2"
    assert sched.place(whole("m2", kinds=("a10",))).host_id == "a10-1"


def test_zone_affinity_keeps_the_machine_next_to_its_volume() -> None:
    sched = scheduler(gpu_host("a-1", zone="ord-a"), gpu_host("b-2", zone="ord-b"))
    assert sched.place(whole("m1", zone="ord-b")).host_id == "b-2"
    with pytest.raises(InsufficientCapacity):
        sched.place(whole("m2", zone="ord-c"))


# -- GPU locality and state ----------------------------------------------------------------


def test_multi_gpu_machines_stay_inside_one_nvlink_partition() -> None:
    sched = scheduler(gpu_host("gpu-1", gpus=8, partition_size=4))
    first = sched.place(whole("m1", gpus=2)).claim.gpu_indexes
    assert first == (0, 1)
    second = sched.place(whole("m2", gpus=4)).claim.gpu_indexes
    assert second == (4, 5, 6, 7)
    with pytest.raises(InsufficientCapacity):
        sched.place(whole("m3", gpus=4))  # two free GPUs left, both in partition 0
    assert sched.place(whole("m4", gpus=2)).claim.gpu_indexes == (2, 3)


def test_a_partial_partition_is_used_before_a_whole_one() -> None:
    sched = scheduler(gpu_host("gpu-1", gpus=8, partition_size=4))
    sched.place(whole("m1", gpus=1))
    placed = [sched.place(whole(f"m{n}", gpus=1)).claim.gpu_indexes[0] for n in range(2, 5)]
    assert placed == [1, 2, 3]
    assert sched.place(whole("m5", gpus=4)).claim.gpu_indexes == (4, 5, 6, 7)


def test_gpus_of_a_machine_share_a_numa_node_when_one_has_enough() -> None:
    sched = scheduler(gpu_host("gpu-1", gpus=4, numa_nodes=2))
    sched.place(whole("m1", gpus=1))  # takes GPU 0 on NUMA node 0
    assert sched.place(whole("m2", gpus=2)).claim.gpu_indexes == (2, 3)


def test_quarantined_and_cleaning_gpus_are_never_offered() -> None:
    host = gpu_host("gpu-1", gpus=4, states={0: GpuState.QUARANTINED, 1: GpuState.CLEANING})
    sched = scheduler(host)
    with pytest.raises(InsufficientCapacity):
        sched.place(whole("m1", gpus=3))
    held = sched.place(whole("m2", gpus=2)).claim.gpu_indexes
    assert held == (2, 3)
    with pytest.raises(InsufficientCapacity):
        sched.place(share("m3", 100))


# -- packing -------------------------------------------------------------------------------


def test_shares_fill_a_used_gpu_before_opening_another() -> None:
    sched = scheduler(gpu_host("gpu-1", gpus=2))
    assert sched.place(share("s1", 500)).claim.gpu_indexes == (0,)
    assert sched.place(share("s2", 300)).claim.gpu_indexes == (0,)
    assert sched.place(share("s3", 300)).claim.gpu_indexes == (1,)
    assert sched.place(share("s4", 200)).claim.gpu_indexes == (0,)


def test_small_machines_pack_one_host_and_leave_another_whole() -> None:
    sched = scheduler(gpu_host("gpu-1"), gpu_host("gpu-2"))
    hosts = {sched.place(whole(f"m{n}", cpu=4)).host_id for n in range(5)}
    assert len(hosts) == 1
    assert sched.place(whole("big", gpus=8)).host_id not in hosts


def test_cpu_machines_go_where_cpu_is_spare_for_the_gpus() -> None:
    profile = WorkloadProfile.from_requests([whole(f"g{n}", cpu=12) for n in range(4)])
    tight = gpu_host("gpu-1", gpus=8, cpu=100, allow_cpu_machines=True)  # needs 96 cores
    roomy = gpu_host("gpu-2", gpus=2, cpu=104, allow_cpu_machines=True)
    sched = scheduler(tight, roomy, profile=profile)
    assert sched.place(cpu_only("c1", cpu=16)).host_id == "gpu-2"


def test_cpu_machines_prefer_hosts_whose_gpus_are_all_taken() -> None:
    profile = WorkloadProfile.from_requests([whole("g", cpu=8)])
    full = gpu_host("gpu-1", gpus=1, cpu=64, allow_cpu_machines=True).with_claim(
        Claim("taken", 8000, 1024, (0,), 1000)
    )
    spare = gpu_host("gpu-2", gpus=1, cpu=24, allow_cpu_machines=True)  # the tighter CPU fit
    sched = scheduler(full, spare, profile=profile)
    assert sched.place(cpu_only("c1", cpu=8)).host_id == "gpu-1"


def cpu_heavy_profile(cpu_only_cores: int) -> WorkloadProfile:
    """GPU machines of 10 cores a GPU, and CPU-only machines of ``cpu_only_cores`` in all."""
    return WorkloadProfile.from_requests(
        [
            *(whole(f"g{n}", cpu=10) for n in range(8)),
            *(cpu_only(f"c{n}", cpu=cpu_only_cores // 8) for n in range(8)),
        ]
    )


def test_the_profile_counts_cpu_only_demand_per_gpu() -> None:
    profile = cpu_heavy_profile(64)
    assert profile.cpu_per_gpu_milli == 10
    assert profile.cpu_only_per_gpu_milli == 8


def test_when_cpu_binds_cpu_light_machines_fill_cpu_poor_hosts_first() -> None:
    def fleet() -> tuple[HostState, ...]:
        poor = gpu_host("gpu-1", gpus=8, cpu=96, allow_cpu_machines=True)  # 12 cores a GPU
        rich = gpu_host("gpu-2", gpus=2, cpu=104, allow_cpu_machines=True)
        return poor, rich

    # 10 + 2 cores a GPU wanted, 200 / 10 GPUs = 20 there: GPUs run out first, pack as usual
    relaxed = scheduler(*fleet(), profile=cpu_heavy_profile(16))
    assert not relaxed.index.cpu_bound("ord")
    assert relaxed.place(whole("m", cpu=4)).host_id == "gpu-2"
    # 10 + 12 cores a GPU wanted: CPU runs out first; the CPU-poor host's GPUs go first
    bound = scheduler(*fleet(), profile=cpu_heavy_profile(96))
    assert bound.place(whole("m", cpu=4)).host_id == "gpu-1"
    assert bound.index.cpu_bound("ord")
    assert bound.index.cpu_reserve("ord") == pytest.approx(13)


def test_when_cpu_binds_gpu_machines_spread_over_the_kinds_hosts() -> None:
    def busy(host_id: str, gpus: int, cores: int) -> HostState:
        """96 cores and 8 GPUs, ``gpus`` of them and ``cores`` cores already taken."""
        host = gpu_host(host_id, gpus=8, cpu=96, allow_cpu_machines=True)
        return host.with_claim(Claim(f"{host_id}-m", cores * 1000, 1024, tuple(range(gpus)), 1000))

    def fleet(idle: bool) -> tuple[HostState, ...]:
        # every host short of CPU for its free GPUs either way: only the order differs
        hosts = (busy("gpu-1", 6, 80), busy("gpu-2", 2, 40))
        return (
            (*hosts, gpu_host("gpu-3", gpus=8, cpu=96, allow_cpu_machines=True)) if idle else hosts
        )

    # 10 + 1 cores a GPU wanted, 288 / 24 GPUs = 12 there: GPUs run out first, pack
    relaxed = scheduler(*fleet(idle=True), profile=cpu_heavy_profile(8))
    assert relaxed.place(whole("m", cpu=4)).host_id == "gpu-1"
    assert not relaxed.index.spreads("ord")
    # 10 + 12 cores a GPU wanted: CPU runs out first; idle hosts first, then most whole free
    bound = scheduler(*fleet(idle=True), profile=cpu_heavy_profile(96))
    assert bound.place(whole("m", cpu=4)).host_id == "gpu-3"
    assert bound.index.spreads("ord")
    bound = scheduler(*fleet(idle=False), profile=cpu_heavy_profile(96))
    assert bound.place(whole("m", cpu=4)).host_id == "gpu-2"
    assert bound.place(share("s", milli=500, cpu=2)).host_id == "gpu-2"


def test_cpu_only_demand_counts_only_where_it_shares_the_gpu_hosts() -> None:
    dedicated = scheduler(
        gpu_host("gpu-1", gpus=8, cpu=96),
        general_host("cpu-2", cpu=8),
        profile=cpu_heavy_profile(96),
    )
    dedicated.place(whole("m", cpu=4))
    assert not dedicated.index.cpu_bound("ord"), "CPU-only machines never take the GPU hosts' CPU"


# -- errors and release --------------------------------------------------------------------


def test_capacity_errors_name_the_regions_and_the_kind() -> None:
    sched = scheduler(gpu_host("gpu-1", region="ord", kind="a10", gpus=2))
    with pytest.raises(InsufficientCapacity) as raised:
        sched.place(whole("m1", gpus=4, kinds=("a10",), region="ord,iad"))
    error = raised.value
    assert error.http_status == 422
    assert error.code == "insufficient_capacity"
    assert "ord, iad" in error.message and "a10" in error.message
    assert error.fields["regions"] == ["ord", "iad"]
    assert error.fields["gpu_kinds"] == ["a10"]
    assert error.fields["gpus"] == 4


def test_a_placement_needs_a_machine_id() -> None:
    with pytest.raises(InvalidRequest):
        scheduler(gpu_host("gpu-1")).place(PlacementRequest(cpu_milli=0, memory_mb=0, gpus=1))


def test_release_frees_cpu_and_sends_the_gpus_to_cleaning() -> None:
    store = InMemoryClaimStore([gpu_host("gpu-1", gpus=1)])
    sched = Scheduler(store)
    placement = sched.place(whole("m1"))
    sched.release(placement.host_id, "m1")
    record = store.read_host("gpu-1")
    assert record is not None
    assert record.state.claims == ()
    assert record.state.gpus[0].state is GpuState.CLEANING
    with pytest.raises(InsufficientCapacity):
        sched.place(whole("m2"))
    store.put_host(record.state.with_gpu_state(0, GpuState.FREE))  # the agent scrubbed it
    sched.refresh()
    assert sched.place(whole("m2")).host_id == "gpu-1"


def _host_of(gpus: list[tuple[int, int | None]]) -> HostState:
    """A host whose GPU i sits on NUMA node gpus[i][0] and in NVLink partition gpus[i][1]."""
    return HostState(
        id="h",
        region="r",
        pool=Pool.GPU,
        cpu_milli=64_000,
        memory_mb=65536,
        gpus=tuple(
            Gpu(i, "h100-sxm", f"0000:0{i}:00.0", numa, partition)
            for i, (numa, partition) in enumerate(gpus)
        ),
    )


def test_pick_whole_gpus_keeps_requests_close_and_leaves_big_groups_whole() -> None:
    host = _host_of([(0, None), (1, None), (1, None), (0, None), (0, None)])
    assert pick_whole_gpus(host, 2) == (1, 2)
    assert pick_whole_gpus(host, 3) == (0, 3, 4)
    assert len(pick_whole_gpus(host, 4)) == 4
    linked = _host_of([(0, 1), (1, 1), (0, None)])
    assert pick_whole_gpus(linked, 2) == (0, 1)


def test_a_placement_on_one_named_host_honours_its_gpus() -> None:
    host = _host_of([(0, None), (1, None)])
    scheduler = Scheduler(InMemoryClaimStore([host]))
    two = PlacementRequest(cpu_milli=1000, memory_mb=1024, gpus=2, machine_id="m1", host_id="h")
    assert scheduler.place(two).claim.gpu_indexes == (0, 1)
    with pytest.raises(InsufficientCapacity):
        scheduler.place(
            PlacementRequest(cpu_milli=1000, memory_mb=1024, gpus=1, machine_id="m2", host_id="h")
        )
    elsewhere = PlacementRequest(cpu_milli=1, memory_mb=1, machine_id="m3", host_id="nowhere")
    with pytest.raises(InsufficientCapacity):
        scheduler.place(elsewhere)
