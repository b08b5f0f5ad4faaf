"""Property tests: no sequence of placements and releases, by racing schedulers, over-commits
a host or puts a GPU in two modes; and a scheduler with a fresh view refuses a request only when
nothing fits. Whole GPUs, time shares and MIG slices all take part."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from hypothesis import event, given, settings
from hypothesis import strategies as st

from hangar.errors import InsufficientCapacity
from hangar.model.gpu import GpuState
from hangar.scheduler import (
    GpuMode,
    HostState,
    InMemoryClaimStore,
    PlacementRequest,
    Pool,
    RegionCatalog,
    Scheduler,
    VersionedHost,
    WorkloadProfile,
)
from tests.scheduler.fleet import general_host, gpu_host, mig_host, share, slice_of, whole

KINDS = st.sampled_from([None, ("a100",), ("l40s",), ("a100", "l40s")])
SLICE_KINDS = st.sampled_from([None, ("a100-sxm4-80gb",), ("h100-sxm",)])
PROFILES = st.sampled_from(["1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"])
REGIONS = st.sampled_from(["", "ord", "iad", "iad,ord", "us"])
CPU = st.integers(0, 24)
MEMORY = st.integers(0, 96)

REQUESTS = st.one_of(
    st.builds(
        lambda gpus, kinds, cpu, memory, region: whole("", gpus, kinds, region, cpu, memory),
        st.integers(1, 8),
        KINDS,
        CPU,
        MEMORY,
        REGIONS,
    ),
    st.builds(
        lambda milli, kinds, cpu, memory, region: share("", milli, kinds, region, cpu, memory),
        st.integers(1, 999),
        KINDS,
        CPU,
        MEMORY,
        REGIONS,
    ),
    st.builds(
        lambda profile, kinds, cpu, memory, region: slice_of(
            "", profile, kinds, region, cpu, memory
        ),
        PROFILES,
        SLICE_KINDS,
        CPU,
        MEMORY,
        REGIONS,
    ),
    st.builds(
        lambda cpu, memory, region: PlacementRequest(
            cpu_milli=cpu * 1000, memory_mb=memory * 1024, region=region
        ),
        CPU,
        MEMORY,
        REGIONS,
    ),
)
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("place"), st.integers(0, 1), st.booleans(), REQUESTS),
        st.tuples(st.just("release"), st.integers(0, 1), st.integers(0, 10_000)),
    ),
    max_size=40,
)


def fleet() -> InMemoryClaimStore:
    return InMemoryClaimStore(
        [
            gpu_host(
                "a100-1",
                kind="a100",
                gpus=8,
                cpu=64,
                memory_gb=256,
                partition_size=4,
                numa_nodes=2,
                region="ord",
                allow_cpu_machines=True,
                states={3: GpuState.QUARANTINED},
            ),
            gpu_host("l40s-2", kind="l40s", gpus=4, cpu=32, memory_gb=128, region="iad"),
            general_host("cpu-3", cpu=16, memory_gb=64, region="ord"),
            mig_host(
                "mig-4",
                gpus=3,
                layout=("3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"),
                plain=1,
                region="iad",
            ),
            mig_host("mig-5", kind="h100-sxm", gpus=1, layout=("1g.10gb",) * 7, region="ord"),
        ]
    )


def with_id(request: PlacementRequest, machine_id: str) -> PlacementRequest:
    return replace(request, machine_id=machine_id)


def fits_somewhere(snapshot: Mapping[str, VersionedHost], request: PlacementRequest) -> bool:
    """Brute force over the store, independent of the index."""
    regions = set(RegionCatalog({"us": ("iad", "ord")}).expand(request.region, {"ord", "iad"}))
    for record in snapshot.values():
        host = record.state
        if host.region not in regions or host.free_cpu_milli < request.cpu_milli:
            continue
        if host.free_memory_mb < request.memory_mb:
            continue
        if not request.wants_gpu:
            if host.pool is Pool.GENERAL or host.allow_cpu_machines:
                return True
            continue
        if host.pool is not Pool.GPU or not request.accepts_kind(host.kind):
            continue
        usable = [gpu for gpu in host.gpus if gpu.state is GpuState.FREE]
        if request.gpu_slice:
            if any(slice_fits(host, gpu.index, request.gpu_slice) for gpu in usable):
                return True
            continue
        if request.gpu_milli:
            shareable = [g for g in usable if host.gpu_modes[g.index] is not GpuMode.MIG]
            if any(host.gpu_used_milli[g.index] + request.gpu_milli <= 1000 for g in shareable):
                return True
            continue
        unused: dict[object, int] = {}
        for gpu in usable:
            if host.gpu_used_milli[gpu.index] == 0:
                unused[gpu.nvlink_partition] = unused.get(gpu.nvlink_partition, 0) + 1
        if max(unused.values(), default=0) >= request.gpus:
            return True
    return False


def slice_fits(host: HostState, index: int, profile: str) -> bool:
    """A free instance of ``profile`` on GPU ``index``: the GPU is idle or already cut."""
    layout = host.gpus[index].mig_layout
    held = {claim.mig_instance for claim in host.claims if claim.gpu_indexes == (index,)}
    if host.gpu_used_milli[index] and not all(
        claim.gpu_slice for claim in host.claims if index in claim.gpu_indexes
    ):
        return False
    return any(name == profile and n not in held for n, name in enumerate(layout))


def assert_not_over_committed(snapshot: Mapping[str, VersionedHost]) -> None:
    owners: dict[str, str] = {}
    for record in snapshot.values():
        host = record.state
        assert sum(c.cpu_milli for c in host.claims) <= host.cpu_milli
        assert sum(c.memory_mb for c in host.claims) <= host.memory_mb
        used = [0] * len(host.gpus)
        whole_holders = [0] * len(host.gpus)
        for claim in host.claims:
            assert owners.setdefault(claim.machine_id, host.id) == host.id
            for index in claim.gpu_indexes:
                used[index] += claim.gpu_milli
                whole_holders[index] += claim.gpu_milli == 1000
                assert host.gpus[index].state is not GpuState.QUARANTINED
        assert all(milli <= 1000 for milli in used)
        assert all(count <= 1 for count in whole_holders)
        for gpu in host.gpus:
            holders = [c for c in host.claims if gpu.index in c.gpu_indexes]
            kinds = {
                "mig" if c.gpu_slice else "whole" if c.gpu_milli == 1000 else "shared"
                for c in holders
            }
            assert len(kinds) <= 1, f"GPU {gpu.index} of {host.id} is {kinds} at once"
            instances = [c.mig_instance for c in holders if c.gpu_slice]
            assert len(instances) == len(set(instances))
            for claim in holders:
                if claim.gpu_slice:
                    assert gpu.mig_layout[claim.mig_instance] == claim.gpu_slice
        for gpu in host.gpus:
            if whole_holders[gpu.index]:
                assert gpu.state is GpuState.CLAIMED and used[gpu.index] == 1000
        if host.pool is Pool.GPU and not host.allow_cpu_machines:
            assert all(claim.gpu_indexes for claim in host.claims)


@settings(max_examples=150, deadline=None)
@given(OPERATIONS, st.booleans())
def test_no_sequence_of_places_and_releases_over_commits(
    operations: list[tuple[object, ...]], with_profile: bool
) -> None:
    store = fleet()
    profile = (
        WorkloadProfile.from_requests(
            [share("", 300), whole("", 2, ("l40s",)), whole("", 4), slice_of("", "1g.10gb")]
        )
        if with_profile
        else None
    )
    catalog = RegionCatalog({"us": ("iad", "ord")})
    schedulers = [Scheduler(store, profile, catalog), Scheduler(store, profile, catalog)]
    live: list[tuple[str, str]] = []
    for number, operation in enumerate(operations):
        if operation[0] == "place":
            _, which, fresh, request = operation
            assert isinstance(which, int) and isinstance(request, PlacementRequest)
            scheduler = schedulers[which]
            if fresh:
                scheduler.refresh()
                expected = fits_somewhere(store.snapshot(), request)
            try:
                placement = scheduler.place(with_id(request, f"m{number}"))
            except InsufficientCapacity:
                assert not (fresh and expected), "refused a request that fits"
            else:
                assert not fresh or expected, "placed a request that fits nowhere"
                event(f"placed {placement.claim.mode}")
                live.append((placement.host_id, placement.claim.machine_id))
        elif live:
            _, which, pick = operation
            assert isinstance(which, int) and isinstance(pick, int)
            host_id, machine_id = live.pop(pick % len(live))
            schedulers[which].release(host_id, machine_id)
            finish_handoffs(store)
        assert_not_over_committed(store.snapshot())


def finish_handoffs(store: InMemoryClaimStore) -> None:
    """The agent's scrub: GPUs left ``cleaning`` are free again (slices go back to whole)."""
    for record in store.snapshot().values():
        state = record.state
        for gpu in state.gpus:
            if gpu.state is GpuState.CLEANING:
                state = state.with_gpu_state(gpu.index, GpuState.FREE)
        if state is not record.state:
            assert store.compare_and_set(state.id, record.version, state)
