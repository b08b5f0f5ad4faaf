"""The placement index: finds the best host for a request without scanning the fleet.

The policy (fragmentation-aware packing) is a lexicographic order over candidates; this module
keeps hosts in buckets ordered the same way, so a search walks buckets best-first and stops at
the first host that fits.

GPU requests, per (region, kind), minimise:

1. the kind's pressure level (``pressure.kind_levels``): flexible requests leave kinds that
   others cannot do without;
2. for a share of one GPU, ``WorkloadProfile.share_gap_cost`` of the GPU it lands on (whole
   GPUs: nothing at this step);
3. the CPU effect: -1 if the machine brings less CPU than its GPUs need (``cpu_per_gpu_milli``)
   to a host already short of CPU for its free GPUs, +1 if it makes a host short, else 0;
4. idle hosts last (keep whole hosts for whole-host requests);
5. whole free GPUs left on the host (pack hosts, leave others whole);
6. the host's rank (a stable order: equal candidates fill hosts in the same order).

"The CPU its GPUs need" is ``cpu_per_gpu_milli`` of the profile per free milli-GPU, except in a
CPU-bound region: when the profile's CPU demand (GPU machines' and CPU-only machines', per
milli-GPU of GPU demand) reaches the CPU the region's hosts have per milli-GPU, every CPU will
be taken and a GPU left without CPU is lost, so each free GPU reserves ``CPU_BOUND_RESERVE``
times as much. CPU-light GPU machines then fill the CPU-poor hosts first and CPU-only machines
keep off the CPU those hosts' GPUs need.

A CPU-bound region also reverses steps 4 and 5 inside a kind: GPU machines spread (idle hosts
first, then the hosts with the most whole GPUs free) instead of packing (``spreads``). There the
CPU, not the GPUs, runs out: a host kept whole keeps its CPU, and since a request that fits is
never refused, CPU-only machines (CPU-heavy, no GPU) end up taking that CPU when nothing else
is left. Spreading hands the GPU machines that CPU first and leaves no large CPU holes behind,
so late CPU-only machines fail to fit rather than GPU machines. Between kinds the order is
unchanged (the kind whose best host is fullest goes first), and MIG slices still pack.

A MIG slice goes to a free instance of its profile on a GPU already in MIG mode when there is
one (pack cut GPUs), else to an idle GPU whose layout has the profile, on the busiest host
(fewest whole GPUs free, not an idle host when another will do). Shares and whole GPUs take
GPUs without a MIG layout first, so GPUs set aside for slices stay whole. A GPU fixed in MIG
mode (``Gpu.mig_fixed``: the operator's, on a real host) serves only its instances: it is
never a whole or shared candidate, nor counted among a host's whole free GPUs.

CPU-only requests minimise: leaving the host short of CPU for its free GPUs; then prefer
hosts without free GPUs (their CPU is of no use to GPU machines) over hosts with some, and
those over idle hosts able to take a multi-GPU request of the profile; then the CPU left over
beyond what the free GPUs need (best fit); rank.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from hangar.model.gpu import GpuState
from hangar.scheduler.mig import profile_milli
from hangar.scheduler.model import (
    MILLI_PER_GPU,
    Claim,
    Gpu,
    GpuMode,
    HostState,
    PlacementRequest,
    Pool,
)
from hangar.scheduler.pressure import kind_levels
from hangar.scheduler.profile import WorkloadProfile

Rank = tuple[int, str]
PRESSURE_REFRESH = 200
"""GPU requests between two recomputations of a region's kind pressure (and CPU mode)."""
CPU_BOUND_RESERVE = 1.3
"""CPU reserved per free GPU in a CPU-bound region, as a multiple of the CPU the profile's GPU
machines bring per GPU. Measured on the trace's CPU-heavy mixes (1.3 to 1.5 do about equally
well; 1.0 loses a point where CPU-only pods crowd the GPU hosts)."""


def stable_rank(host_id: str) -> int:
    """Default host order: a hash, so consolidation does not always start at the same rack."""
    return zlib.crc32(host_id.encode())


@dataclass(slots=True)
class HostEntry:
    """What the search needs to know about one host, derived from its state."""

    state: HostState
    version: int
    rank: Rank
    gaps: dict[int, int]
    """Free milli of a GPU a share can use -> the lowest GPU index with that much free (for a
    whole free GPU, one without a MIG layout first)."""
    open_slices: dict[str, tuple[int, int]]
    """MIG profile -> (GPU, instance): a free instance on a GPU already in MIG mode (one
    holding slices first, then an idle GPU fixed in MIG mode)."""
    fresh_slices: dict[str, tuple[int, int]]
    """MIG profile -> (GPU, instance): an idle GPU whose layout has the profile."""
    whole_free: int
    max_group_free: int
    """Most unused GPUs inside one NVLink partition (the whole host when it has none)."""
    free_gpu_milli: int
    idle: bool
    surplus: float
    """Free CPU beyond what the free GPUs need (negative: the host is short of CPU)."""
    cpu_candidate: bool
    scarce: bool
    pickable: frozenset[int] | None = None
    """Counts of whole GPUs that can be claimed together here, where IOMMU groups or Fabric
    Manager partitions constrain it; None: any count up to ``max_group_free``."""

    def can_take(self, gpus: int) -> bool:
        """Whether ``gpus`` whole GPUs (0: none) can be claimed together on this host."""
        if gpus <= 0:
            return True
        return gpus <= self.max_group_free if self.pickable is None else gpus in self.pickable

    @property
    def starved(self) -> bool:
        return self.surplus < 0

    @property
    def cpu_class(self) -> int:
        """Order of preference for CPU-only machines: hosts with no free GPU (their CPU is
        of no use to GPU machines), hosts with free GPUs, idle hosts kept for multi-GPU."""
        if self.scarce:
            return 2
        return 1 if self.free_gpu_milli else 0

    @property
    def bucket(self) -> tuple[bool, int, bool]:
        return (self.idle, self.whole_free, self.starved)


@dataclass(frozen=True, slots=True)
class Choice:
    state: HostState
    version: int
    gpu_indexes: tuple[int, ...]
    gpu_milli: int
    gpu_slice: str = ""
    mig_instance: int = -1

    @property
    def host_id(self) -> str:
        return self.state.id

    def claim(self, request: PlacementRequest, machine_id: str | None = None) -> Claim:
        """The claim that takes this choice for ``request``."""
        return Claim(
            request.machine_id if machine_id is None else machine_id,
            request.cpu_milli,
            request.memory_mb,
            self.gpu_indexes,
            self.gpu_milli,
            self.gpu_slice,
            self.mig_instance,
        )


@dataclass(slots=True)
class _Fleet:
    """A region's capacity, for telling whether CPU or GPUs run out first."""

    gpu_host_cpu: int = 0
    gpu_milli: int = 0
    other_cpu: int = 0
    """CPU of hosts without GPUs that run CPU-only machines."""
    shared_gpu_hosts: int = 0
    """GPU hosts that run CPU-only machines too."""


class _RankedSet:
    """Host ranks in order; small enough in practice for a sorted list."""

    __slots__ = ("_ranks",)

    def __init__(self) -> None:
        self._ranks: list[Rank] = []

    def add(self, rank: Rank) -> None:
        insort(self._ranks, rank)

    def discard(self, rank: Rank) -> None:
        position = bisect_left(self._ranks, rank)
        if position < len(self._ranks) and self._ranks[position] == rank:
            del self._ranks[position]

    def __iter__(self) -> Iterator[Rank]:
        return iter(self._ranks)

    def __bool__(self) -> bool:
        return bool(self._ranks)


Buckets = dict[tuple[bool, int, bool], _RankedSet]


class _KindBuckets:
    __slots__ = ("free_milli", "fresh_slices", "gaps", "hosts", "open_slices", "whole")

    def __init__(self) -> None:
        self.whole: Buckets = {}
        self.gaps: dict[int, Buckets] = {}
        self.open_slices: dict[str, _RankedSet] = {}
        self.fresh_slices: dict[str, _RankedSet] = {}
        self.free_milli = 0
        self.hosts = 0


class PlacementIndex:
    """Hosts of one fleet view, bucketed for the policy. Not thread-safe: one per scheduler."""

    def __init__(
        self,
        profile: WorkloadProfile,
        rank_of: Callable[[str], int] = stable_rank,
        pressure_refresh: int = PRESSURE_REFRESH,
    ) -> None:
        self.profile = profile
        self._rank_of = rank_of
        self._pressure_refresh = pressure_refresh
        self._entries: dict[str, HostEntry] = {}
        self._gpu: dict[tuple[str, str], _KindBuckets] = {}
        self._kinds: dict[str, set[str]] = {}
        self._cpu: dict[str, tuple[list[tuple[float, Rank]], ...]] = {}
        self._levels: dict[str, dict[str, int]] = {}
        self._gpu_requests: dict[str, int] = {}
        self._hosts_per_region: dict[str, int] = {}
        self._regions: frozenset[str] = frozenset()
        self._fleet: dict[str, _Fleet] = {}
        self._cpu_reserve: dict[str, float] = {}
        """Region -> milli-CPUs each free milli-GPU reserves (the profile's, or more)."""
        self._spread: set[str] = set()
        """CPU-bound regions, where GPU machines spread over hosts instead of packing."""

    # -- maintenance ---------------------------------------------------------------------

    def upsert(self, state: HostState, version: int) -> HostEntry:
        self.remove(state.id)
        entry = self._derive(state, version)
        self._entries[state.id] = entry
        self._register(entry)
        self._add_to_fleet(state, 1)
        count = self._hosts_per_region.get(state.region, 0)
        self._hosts_per_region[state.region] = count + 1
        if not count:
            self._regions = frozenset(self._hosts_per_region)
        return entry

    def remove(self, host_id: str) -> None:
        entry = self._entries.pop(host_id, None)
        if entry is not None:
            self._unregister(entry)
            self._add_to_fleet(entry.state, -1)
            region = entry.state.region
            self._hosts_per_region[region] -= 1
            if not self._hosts_per_region[region]:
                del self._hosts_per_region[region]
                self._regions = frozenset(self._hosts_per_region)

    def _add_to_fleet(self, state: HostState, sign: int) -> None:
        fleet = self._fleet.setdefault(state.region, _Fleet())
        if state.pool is Pool.GPU and state.gpus:
            fleet.gpu_host_cpu += sign * state.cpu_milli
            fleet.gpu_milli += sign * len(state.gpus) * MILLI_PER_GPU
            fleet.shared_gpu_hosts += sign * state.allow_cpu_machines
        elif state.pool is Pool.GENERAL or state.allow_cpu_machines:
            fleet.other_cpu += sign * state.cpu_milli

    def cpu_reserve(self, region: str) -> float:
        """Milli-CPUs a free milli-GPU in ``region`` reserves (see the module docstring)."""
        return self._cpu_reserve.get(region, self.profile.cpu_per_gpu_milli)

    def cpu_bound(self, region: str) -> bool:
        """Whether the profile's machines would take all the CPU ``region``'s GPUs can use:
        GPU machines' CPU, plus CPU-only machines' when GPU hosts take them, against the GPU
        hosts' CPU (plus the other hosts' when CPU-only machines share the GPU hosts)."""
        fleet = self._fleet.get(region)
        profile = self.profile
        if fleet is None or fleet.gpu_milli <= 0 or profile.cpu_per_gpu_milli <= 0:
            return False
        demand = profile.cpu_per_gpu_milli * fleet.gpu_milli
        cpu = fleet.gpu_host_cpu
        if fleet.shared_gpu_hosts:
            demand += profile.cpu_only_per_gpu_milli * fleet.gpu_milli
            cpu += fleet.other_cpu
        return demand >= cpu

    def spreads(self, region: str) -> bool:
        """Whether GPU machines in ``region`` spread over hosts (it was CPU-bound when last
        checked) instead of packing them (see the module docstring)."""
        return region in self._spread

    def _refresh_cpu_mode(self, region: str) -> None:
        """Set the region's CPU reserve and spreading; when the reserve changes, derive its
        hosts again."""
        base = self.profile.cpu_per_gpu_milli
        bound = self.cpu_bound(region)
        if bound:
            self._spread.add(region)
        else:
            self._spread.discard(region)
        reserve = base * CPU_BOUND_RESERVE if bound else base
        if reserve == self.cpu_reserve(region):
            return
        self._cpu_reserve[region] = reserve
        for entry in [e for e in self._entries.values() if e.state.region == region]:
            self.upsert(entry.state, entry.version)

    def get(self, host_id: str) -> HostEntry | None:
        return self._entries.get(host_id)

    def entries(self) -> Iterable[HostEntry]:
        return self._entries.values()

    def regions(self) -> frozenset[str]:
        return self._regions

    # -- search --------------------------------------------------------------------------

    def choose(self, request: PlacementRequest, region: str) -> Choice | None:
        """The policy's best host in ``region`` for ``request``, or None if nothing fits."""
        if request.gpu_slice:
            return self._choose_slice(request, region)
        if request.wants_gpu:
            return self._choose_gpu(request, region)
        return self._choose_cpu(request, region)

    def choose_on(self, request: PlacementRequest, host_id: str) -> Choice | None:
        """Whether ``request`` fits on the one host ``host_id`` (a hard constraint), and the
        GPUs the policy would give it there; None if it does not fit."""
        entry = self._entries.get(host_id)
        if entry is None or not _fits(entry, request):
            return None
        if not request.wants_gpu:
            return Choice(entry.state, entry.version, (), 0) if entry.cpu_candidate else None
        if not request.accepts_kind(entry.state.kind):
            return None
        if request.gpu_slice:
            profile = request.gpu_slice
            slot = entry.open_slices.get(profile) or entry.fresh_slices.get(profile)
            if slot is None:
                return None
            gpu, instance = slot
            milli = profile_milli(profile)
            return Choice(entry.state, entry.version, (gpu,), milli, profile, instance)
        if not entry.gaps:
            return None
        if request.gpus:
            if not entry.can_take(request.gpus):
                return None
            gpus = pick_whole_gpus(entry.state, request.gpus)
            return Choice(entry.state, entry.version, gpus, MILLI_PER_GPU)
        share = request.gpu_milli
        fitting = [gap for gap in entry.gaps if gap >= share]
        if not fitting:
            return None
        gap = min(fitting, key=lambda g: self.profile.share_gap_cost(g, share))
        return Choice(entry.state, entry.version, (entry.gaps[gap],), share)

    def _choose_slice(self, request: PlacementRequest, region: str) -> Choice | None:
        profile = request.gpu_slice
        kinds = [kind for kind in self._kinds.get(region, ()) if request.accepts_kind(kind)]
        if not kinds:
            return None
        levels = self._region_levels(region)
        best: tuple[tuple[int, int, bool, int, Rank], Choice] | None = None
        for kind in sorted(kinds):
            buckets = self._gpu[(region, kind)]
            level = levels.get(kind, 0)
            for opened, ranked in enumerate(
                (buckets.open_slices.get(profile), buckets.fresh_slices.get(profile))
            ):
                if not ranked:
                    continue
                found: tuple[tuple[int, int, bool, int, Rank], HostEntry] | None = None
                for rank in ranked:
                    entry = self._entries[rank[1]]
                    if not _fits(entry, request):
                        continue
                    key = (opened, level, entry.idle, entry.whole_free, entry.rank)
                    if found is None or key < found[0]:
                        found = (key, entry)
                    if not opened:
                        break  # open instances: the first fit in rank order packs them
                if found is not None:
                    key, entry = found
                    slots = entry.open_slices if not opened else entry.fresh_slices
                    gpu, instance = slots[profile]
                    choice = Choice(
                        entry.state,
                        entry.version,
                        (gpu,),
                        profile_milli(profile),
                        profile,
                        instance,
                    )
                    if best is None or key < best[0]:
                        best = (key, choice)
                    break
        return best[1] if best is not None else None

    def _choose_gpu(self, request: PlacementRequest, region: str) -> Choice | None:
        kinds = [kind for kind in self._kinds.get(region, ()) if request.accepts_kind(kind)]
        if not kinds:
            return None
        levels = self._region_levels(region)
        best: tuple[tuple[float, int, bool, int, Rank], Choice] | None = None
        best_level = 0
        for kind in sorted(kinds, key=lambda k: (levels.get(k, 0), k)):
            level = levels.get(kind, 0)
            if best is not None and level > best_level:
                break
            found = self._best_in_kind(self._gpu[(region, kind)], request, region)
            if found is not None and (best is None or found[0] < best[0]):
                best, best_level = found, level
        return best[1] if best is not None else None

    def _best_in_kind(
        self, buckets: _KindBuckets, request: PlacementRequest, region: str
    ) -> tuple[tuple[float, int, bool, int, Rank], Choice] | None:
        reserve = self.cpu_reserve(region)
        spread = region in self._spread
        if request.gpus:
            wanted = request.gpus
            eligible = {key: ranks for key, ranks in buckets.whole.items() if key[1] >= wanted}
            hit = self._best_in_buckets(
                eligible, request, request.gpus * MILLI_PER_GPU, wanted, reserve, spread
            )
            if hit is None:
                return None
            effect, entry = hit
            key = (0.0, effect, entry.idle, entry.whole_free - wanted, entry.rank)
            gpus = pick_whole_gpus(entry.state, wanted)
            return key, Choice(entry.state, entry.version, gpus, MILLI_PER_GPU)
        share = request.gpu_milli
        cost = self.profile.share_gap_cost
        for gap in sorted((g for g in buckets.gaps if g >= share), key=lambda g: cost(g, share)):
            hit = self._best_in_buckets(buckets.gaps[gap], request, share, 0, reserve, spread)
            if hit is not None:
                effect, entry = hit
                fresh = 1 if gap == MILLI_PER_GPU else 0
                key = (cost(gap, share), effect, entry.idle, entry.whole_free - fresh, entry.rank)
                return key, Choice(entry.state, entry.version, (entry.gaps[gap],), share)
        return None

    def _best_in_buckets(
        self,
        buckets: Buckets,
        request: PlacementRequest,
        gpu_milli: int,
        min_group: int,
        reserve: float,
        spread: bool,
    ) -> tuple[int, HostEntry] | None:
        """The best host among ``buckets`` by (CPU effect, idle, whole free, rank), or with
        ``spread`` by (CPU effect, not idle, most whole free, rank)."""
        if not buckets:
            return None
        delta = request.cpu_milli - reserve * gpu_milli
        keys = sorted(buckets, key=_spread_order) if spread else sorted(buckets)
        passes: list[
            tuple[int, Callable[[tuple[bool, int, bool]], bool], Callable[[HostEntry], bool] | None]
        ]
        if delta < 0:
            passes = [(-1, lambda k: k[2], None), (0, lambda k: not k[2], None)]
        elif delta == 0:
            passes = [(0, lambda k: True, None)]
        else:
            passes = [
                (0, lambda k: not k[2], lambda e: e.surplus >= delta),
                (1, lambda k: True, lambda e: e.starved or e.surplus < delta),
            ]
        for effect, use_bucket, condition in passes:
            group: tuple[bool, int] | None = None
            best: HostEntry | None = None
            for key in keys:
                if not use_bucket(key):
                    continue
                if group is not None and (key[0], key[1]) != group and best is not None:
                    return effect, best
                group = (key[0], key[1])
                found = self._first_fit(buckets[key], request, min_group, condition)
                if found is not None and (best is None or found.rank < best.rank):
                    best = found
            if best is not None:
                return effect, best
        return None

    def _first_fit(
        self,
        ranks: _RankedSet,
        request: PlacementRequest,
        min_group: int,
        condition: Callable[[HostEntry], bool] | None,
    ) -> HostEntry | None:
        entries = self._entries
        for rank in ranks:
            entry = entries[rank[1]]
            if (
                _fits(entry, request)
                and entry.can_take(min_group)
                and (condition is None or condition(entry))
            ):
                return entry
        return None

    def _choose_cpu(self, request: PlacementRequest, region: str) -> Choice | None:
        lists = self._cpu.get(region)
        if lists is None:
            return None
        cpu = request.cpu_milli
        entries = self._entries
        for ordered in lists:
            for position in range(bisect_left(ordered, (cpu,)), len(ordered)):
                entry = entries[ordered[position][1][1]]
                if _fits(entry, request):
                    return Choice(entry.state, entry.version, (), 0)
        for ordered in lists:
            chosen: HostEntry | None = None
            position = bisect_left(ordered, (cpu,)) - 1
            while position >= 0:
                surplus, rank = ordered[position]
                if chosen is not None and surplus != chosen.surplus:
                    break
                entry = entries[rank[1]]
                if _fits(entry, request):
                    chosen = entry
                position -= 1
            if chosen is not None:
                return Choice(chosen.state, chosen.version, (), 0)
        return None

    def _region_levels(self, region: str) -> Mapping[str, int]:
        seen = self._gpu_requests.get(region, 0)
        self._gpu_requests[region] = seen + 1
        if seen % self._pressure_refresh == 0 or region not in self._levels:
            self._refresh_cpu_mode(region)
            free = {kind: self._gpu[(region, kind)].free_milli for kind in self._kinds[region]}
            self._levels[region] = kind_levels(self.profile.kind_demand, free)
        return self._levels[region]

    # -- derivation ----------------------------------------------------------------------

    def _derive(self, state: HostState, version: int) -> HostEntry:
        used = state.gpu_used_milli
        modes = state.gpu_modes
        gaps: dict[int, int] = {}
        open_slices: dict[str, tuple[int, int]] = {}
        fresh_slices: dict[str, tuple[int, int]] = {}
        idle_cut: dict[str, tuple[int, int]] = {}
        sliced_whole: int | None = None
        groups: dict[object, int] = {}
        partitioned = any(gpu.nvlink_partition is not None for gpu in state.gpus)
        whole_free = 0
        free_milli = 0
        for gpu in state.gpus:
            if gpu.state is not GpuState.FREE:
                continue
            mode = modes[gpu.index]
            if mode is GpuMode.MIG:
                for instance in state.free_instances(gpu.index):
                    profile = gpu.mig_layout[instance]
                    open_slices.setdefault(profile, (gpu.index, instance))
                    free_milli += profile_milli(profile)
                continue
            if gpu.mig_fixed:
                # Cut for good (the operator's): its instances, never whole or shared; an idle
                # one is already cut, so it is open too, after GPUs that hold slices (pack).
                for instance in state.free_instances(gpu.index):
                    profile = gpu.mig_layout[instance]
                    idle_cut.setdefault(profile, (gpu.index, instance))
                    free_milli += profile_milli(profile)
                continue
            gap = MILLI_PER_GPU - used[gpu.index]
            if gap <= 0:
                continue
            free_milli += gap
            if gap == MILLI_PER_GPU and gpu.mig_layout:
                for instance, profile in enumerate(gpu.mig_layout):
                    fresh_slices.setdefault(profile, (gpu.index, instance))
                if sliced_whole is None:
                    sliced_whole = gpu.index
            else:
                gaps.setdefault(gap, gpu.index)
            if gap == MILLI_PER_GPU:
                whole_free += 1
                group = _locality_group(gpu) if partitioned else None
                groups[group] = groups.get(group, 0) + 1
        if sliced_whole is not None:
            gaps.setdefault(MILLI_PER_GPU, sliced_whole)
        for profile, slot in idle_cut.items():
            open_slices.setdefault(profile, slot)
        gpu_host = state.pool is Pool.GPU and bool(state.gpus)
        surplus = state.free_cpu_milli - self.cpu_reserve(state.region) * free_milli
        idle = not state.claims
        max_group = max(groups.values(), default=0)
        pickable = pickable_counts(state) if constrained(state) else None
        if pickable is not None:
            max_group = max(pickable, default=0)
        scarce = (
            idle
            and gpu_host
            and any(
                shape.gpus <= max_group
                and shape.cpu_milli <= state.free_cpu_milli
                and shape.memory_mb <= state.free_memory_mb
                and (shape.gpu_kinds is None or state.kind in shape.gpu_kinds)
                for shape in self.profile.multi_gpu_shapes
            )
        )
        return HostEntry(
            state=state,
            version=version,
            rank=(self._rank_of(state.id), state.id),
            gaps=gaps if gpu_host else {},
            open_slices=open_slices if gpu_host else {},
            fresh_slices=fresh_slices if gpu_host else {},
            whole_free=whole_free if gpu_host else 0,
            max_group_free=max_group if gpu_host else 0,
            free_gpu_milli=free_milli,
            idle=idle,
            surplus=surplus,
            cpu_candidate=state.pool is Pool.GENERAL or state.allow_cpu_machines,
            scarce=scarce,
            pickable=pickable,
        )

    def _register(self, entry: HostEntry) -> None:
        state = entry.state
        if entry.gaps or entry.open_slices:
            kind_key = (state.region, state.kind)
            buckets = self._gpu.get(kind_key)
            if buckets is None:
                buckets = self._gpu[kind_key] = _KindBuckets()
                self._kinds.setdefault(state.region, set()).add(state.kind)
            buckets.hosts += 1
            buckets.free_milli += entry.free_gpu_milli
            if entry.whole_free:
                buckets.whole.setdefault(entry.bucket, _RankedSet()).add(entry.rank)
            for gap in entry.gaps:
                by_bucket = buckets.gaps.setdefault(gap, {})
                by_bucket.setdefault(entry.bucket, _RankedSet()).add(entry.rank)
            for profile in entry.open_slices:
                buckets.open_slices.setdefault(profile, _RankedSet()).add(entry.rank)
            for profile in entry.fresh_slices:
                buckets.fresh_slices.setdefault(profile, _RankedSet()).add(entry.rank)
        if entry.cpu_candidate:
            lists = self._cpu.setdefault(state.region, ([], [], []))
            insort(lists[entry.cpu_class], (entry.surplus, entry.rank))

    def _unregister(self, entry: HostEntry) -> None:
        state = entry.state
        if entry.gaps or entry.open_slices:
            kind_key = (state.region, state.kind)
            buckets = self._gpu[kind_key]
            buckets.hosts -= 1
            buckets.free_milli -= entry.free_gpu_milli
            if entry.whole_free:
                _discard(buckets.whole, entry.bucket, entry.rank)
            for gap in entry.gaps:
                by_bucket = buckets.gaps[gap]
                _discard(by_bucket, entry.bucket, entry.rank)
                if not by_bucket:
                    del buckets.gaps[gap]
            _discard_slices(buckets.open_slices, entry.open_slices, entry.rank)
            _discard_slices(buckets.fresh_slices, entry.fresh_slices, entry.rank)
            if not buckets.hosts:
                del self._gpu[kind_key]
                kinds = self._kinds[state.region]
                kinds.discard(state.kind)
                if not kinds:
                    del self._kinds[state.region]
        if entry.cpu_candidate:
            ordered = self._cpu[state.region][entry.cpu_class]
            position = bisect_left(ordered, (entry.surplus, entry.rank))
            if position < len(ordered) and ordered[position] == (entry.surplus, entry.rank):
                del ordered[position]


def _spread_order(key: tuple[bool, int, bool]) -> tuple[bool, int, bool]:
    """A kind's buckets in spreading order: idle hosts first, then most whole free GPUs."""
    idle, whole_free, starved = key
    return (not idle, -whole_free, starved)


def _discard(buckets: Buckets, key: tuple[bool, int, bool], rank: Rank) -> None:
    ranks = buckets.get(key)
    if ranks is not None:
        ranks.discard(rank)
        if not ranks:
            del buckets[key]


def _discard_slices(slices: dict[str, _RankedSet], profiles: Iterable[str], rank: Rank) -> None:
    for profile in profiles:
        ranked = slices[profile]
        ranked.discard(rank)
        if not ranked:
            del slices[profile]


def _fits(entry: HostEntry, request: PlacementRequest) -> bool:
    state = entry.state
    return (
        state.free_cpu_milli >= request.cpu_milli
        and state.free_memory_mb >= request.memory_mb
        and (request.zone is None or state.zone == request.zone)
    )


def _locality_group(gpu: Gpu) -> object:
    return gpu.nvlink_partition if gpu.nvlink_partition is not None else ("alone", gpu.index)


def pick_whole_gpus(state: HostState, count: int) -> tuple[int, ...]:
    """``count`` unused GPUs inside one locality group: the tightest group that fits, and in
    it one NUMA node when one node has enough (the tightest such node).

    IOMMU groups are never split: a group's GPUs are taken all together or not at all. On
    an NVSwitch host (``state.fabric_partitions``) several GPUs are exactly one Fabric
    Manager partition, the one whose enclosing partition is fullest (pack, and leave larger
    partitions whole)."""
    chosen = _pick_units(state, count) if constrained(state) else _pick_ungrouped(state, count)
    if chosen is None:
        raise ValueError(f"host {state.id} has no {count} unused GPUs in one locality group")
    return chosen


def constrained(state: HostState) -> bool:
    """Whether IOMMU groups of several GPUs or Fabric Manager partitions shape claims here."""
    if state.fabric_partitions is not None:
        return True
    groups = [gpu.iommu_group for gpu in state.gpus if gpu.iommu_group is not None]
    return len(groups) != len(set(groups))


def _unused(state: HostState) -> list[Gpu]:
    """GPUs a whole-GPU claim may take now (``HostState.whole_free_indexes``)."""
    gpus = state.gpus
    return [gpus[index] for index in state.whole_free_indexes()]


def _pick_ungrouped(state: HostState, count: int) -> tuple[int, ...] | None:
    partitioned = any(gpu.nvlink_partition is not None for gpu in state.gpus)
    groups: dict[object, list[Gpu]] = {}
    for gpu in _unused(state):
        key = _locality_group(gpu) if partitioned else None
        groups.setdefault(key, []).append(gpu)
    fitting = [gpus for gpus in groups.values() if len(gpus) >= count]
    if not fitting:
        return None
    group = min(fitting, key=lambda gpus: (len(gpus), gpus[0].index))
    by_numa: dict[int, list[Gpu]] = {}
    for gpu in group:
        by_numa.setdefault(gpu.numa_node, []).append(gpu)
    local = [gpus for gpus in by_numa.values() if len(gpus) >= count]
    if local:
        gpus = min(local, key=lambda gpus: (len(gpus), gpus[0].index))
        chosen = sorted(gpus, key=lambda gpu: (bool(gpu.mig_layout), gpu.index))[:count]
    else:
        spread = sorted(by_numa.values(), key=lambda gpus: (-len(gpus), gpus[0].index))
        chosen = [gpu for gpus in spread for gpu in gpus][:count]
    return tuple(sorted(gpu.index for gpu in chosen))


def _free_units(state: HostState) -> list[tuple[int, ...]]:
    """The IOMMU groups (claim units) whose GPUs are all unused, by first index."""
    free = {gpu.index for gpu in _unused(state)}
    units: dict[tuple[int, ...], None] = {}
    for index in sorted(free):
        unit = state.group_indexes(index)
        if set(unit) <= free:
            units[unit] = None
    return list(units)


def _candidate_sets(state: HostState, count: int) -> list[tuple[int, ...]]:
    """Every set of ``count`` unused GPUs that may be claimed together."""
    units = _free_units(state)
    if state.fabric_partitions is not None and count > 1:
        free = {index for unit in units for index in unit}
        return [
            tuple(sorted(p.gpu_indexes))
            for p in state.fabric_partitions
            if len(p.gpu_indexes) == count
            and set(p.gpu_indexes) <= free
            and all(set(state.group_indexes(i)) <= set(p.gpu_indexes) for i in p.gpu_indexes)
        ]
    partitioned = state.fabric_partitions is None and any(
        gpu.nvlink_partition is not None for gpu in state.gpus
    )
    by_locality: dict[object, list[tuple[int, ...]]] = {}
    for unit in units:
        key = _locality_group(state.gpus[unit[0]]) if partitioned else None
        by_locality.setdefault(key, []).append(unit)
    found: list[tuple[int, ...]] = []

    def extend(chosen: list[int], rest: list[tuple[int, ...]]) -> None:
        if len(chosen) == count:
            found.append(tuple(sorted(chosen)))
            return
        for position, unit in enumerate(rest):
            if len(chosen) + len(unit) <= count:
                extend([*chosen, *unit], rest[position + 1 :])

    for group in by_locality.values():
        extend([], group)
    return found


def pickable_counts(state: HostState) -> frozenset[int]:
    """How many whole GPUs can be claimed together on a constrained host right now."""
    units = _free_units(state)
    counts: set[int] = set()
    if state.fabric_partitions is not None:
        counts.update(len(unit) for unit in units if len(unit) == 1)
        free = {index for unit in units for index in unit}
        counts.update(
            len(p.gpu_indexes)
            for p in state.fabric_partitions
            if len(p.gpu_indexes) > 1
            and set(p.gpu_indexes) <= free
            and all(set(state.group_indexes(i)) <= set(p.gpu_indexes) for i in p.gpu_indexes)
        )
        return frozenset(counts)
    partitioned = any(gpu.nvlink_partition is not None for gpu in state.gpus)
    by_locality: dict[object, list[int]] = {}
    for unit in units:
        key = _locality_group(state.gpus[unit[0]]) if partitioned else None
        by_locality.setdefault(key, []).append(len(unit))
    for sizes in by_locality.values():
        sums = {0}
        for size in sizes:
            sums |= {total + size for total in sums}
        counts.update(total for total in sums if total)
    return frozenset(counts)


def _pick_units(state: HostState, count: int) -> tuple[int, ...] | None:
    candidates = _candidate_sets(state, count)
    if not candidates:
        return None
    unused = {gpu.index for gpu in _unused(state)}
    gpus = state.gpus

    def numa_nodes(indexes: tuple[int, ...]) -> int:
        return len({gpus[i].numa_node for i in indexes})

    if state.fabric_partitions is not None:
        partitions = sorted(state.fabric_partitions, key=lambda p: len(p.gpu_indexes))

        def slack(indexes: tuple[int, ...]) -> int:
            """Unused GPUs left in the smallest partition holding these and more."""
            held = set(indexes)
            for partition in partitions:
                members = set(partition.gpu_indexes)
                if len(members) > len(held) and held <= members:
                    return len(members & unused) - len(held)
            return len(unused) - len(held)

        return min(candidates, key=lambda c: (numa_nodes(c), slack(c), c))

    partitioned = any(gpu.nvlink_partition is not None for gpu in gpus)

    def tightness(indexes: tuple[int, ...]) -> tuple[int, int, int, tuple[int, ...]]:
        locality = _locality_group(gpus[indexes[0]]) if partitioned else None
        in_group = [i for i in unused if not partitioned or _locality_group(gpus[i]) == locality]
        nodes = {gpus[i].numa_node for i in indexes}
        on_nodes = sum(1 for i in in_group if gpus[i].numa_node in nodes)
        return (len(in_group), len(nodes), on_nodes, indexes)

    return min(candidates, key=tightness)
