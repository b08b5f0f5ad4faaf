"""The request mix placement plans for (the FGD paper's "target workload").

Three things are learnt from it:

- ``cpu_per_gpu_milli``: milli-CPUs that GPU machines bring per milli-GPU, volume-weighted. A
  host whose free CPU falls short of that for its free GPUs will strand GPUs.
  ``cpu_only_per_gpu_milli``: milli-CPUs CPU-only machines ask for per milli-GPU of GPU
  demand (together they tell whether CPU or GPUs run out first).
- ``gap_waste``: for each free amount of one GPU (0..1000 milli), what stays unusable once it
  is filled with the *typical* share sizes, the most frequent sizes covering ``share_coverage``
  of share requests (rare sizes are left out: there are too few of them to count on).
- ``kind_demand``: GPU volume by the set of kinds requests accept, to tell which kinds are
  oversubscribed by requests that can use nothing else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hangar.scheduler.mig import profile_milli
from hangar.scheduler.model import MILLI_PER_GPU, PlacementRequest

DEFAULT_SHARE_COVERAGE = 0.85


@dataclass(frozen=True, slots=True)
class RequestShape:
    cpu_milli: int
    memory_mb: int
    gpus: int
    gpu_milli: int
    gpu_kinds: frozenset[str] | None
    gpu_slice: str = ""

    @classmethod
    def of(cls, request: PlacementRequest) -> RequestShape:
        return cls(
            request.cpu_milli,
            request.memory_mb,
            request.gpus,
            request.gpu_milli,
            request.gpu_kinds if request.wants_gpu else None,
            request.gpu_slice,
        )

    @property
    def gpu_demand_milli(self) -> int:
        if self.gpu_slice:
            return profile_milli(self.gpu_slice)
        return self.gpus * MILLI_PER_GPU if self.gpus else self.gpu_milli


class WorkloadProfile:
    """Immutable summary of a request mix; see the module docstring."""

    def __init__(
        self,
        shapes: Mapping[RequestShape, float],
        share_coverage: float = DEFAULT_SHARE_COVERAGE,
    ) -> None:
        gpu_volume = 0.0
        gpu_cpu = 0.0
        cpu_only = 0.0
        shares: Counter[int] = Counter()
        kind_demand: dict[frozenset[str] | None, float] = {}
        multi: list[RequestShape] = []
        for shape, weight in shapes.items():
            if weight <= 0:
                continue
            volume = shape.gpu_demand_milli * weight
            if volume:
                gpu_volume += volume
                gpu_cpu += shape.cpu_milli * weight
                kind_demand[shape.gpu_kinds] = kind_demand.get(shape.gpu_kinds, 0.0) + volume
            else:
                cpu_only += shape.cpu_milli * weight
            if shape.gpu_milli:
                shares[shape.gpu_milli] += round(weight * 1_000_000)
            if shape.gpus >= 2:
                multi.append(shape)
        self.cpu_per_gpu_milli = gpu_cpu / gpu_volume if gpu_volume else 0.0
        self.cpu_only_per_gpu_milli = cpu_only / gpu_volume if gpu_volume else 0.0
        self.typical_share_sizes = _typical_sizes(shares, share_coverage)
        self.gap_waste = _gap_waste(self.typical_share_sizes)
        self.kind_demand: Mapping[frozenset[str] | None, float] = kind_demand
        self.multi_gpu_shapes = tuple(sorted(multi, key=lambda s: (s.gpus, s.cpu_milli)))

    @classmethod
    def from_requests(
        cls, requests: Iterable[PlacementRequest], share_coverage: float = DEFAULT_SHARE_COVERAGE
    ) -> WorkloadProfile:
        counts: Counter[RequestShape] = Counter(RequestShape.of(r) for r in requests)
        return cls({shape: float(n) for shape, n in counts.items()}, share_coverage)

    @classmethod
    def empty(cls) -> WorkloadProfile:
        """No knowledge of the mix: plain best fit, no CPU or kind reservations."""
        return cls({})

    def share_gap_cost(self, gap: int, share: int) -> float:
        """Cost of putting a ``share`` slice on a GPU with ``gap`` milli free: the change in
        unusable capacity, then (as a fraction below 1) best fit."""
        waste = self.gap_waste
        left = gap - share
        return waste[left] - waste[gap] + left / MILLI_PER_GPU


def _typical_sizes(shares: Counter[int], coverage: float) -> tuple[int, ...]:
    total = sum(shares.values())
    chosen: list[int] = []
    covered = 0
    for size, count in sorted(shares.items(), key=lambda item: (-item[1], item[0])):
        if covered >= coverage * total:
            break
        chosen.append(size)
        covered += count
    return tuple(sorted(chosen))


def _gap_waste(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """``waste[g]`` = g minus the largest sum of typical sizes (with repeats) that fits in g."""
    reachable = [False] * (MILLI_PER_GPU + 1)
    reachable[0] = True
    for amount in range(1, MILLI_PER_GPU + 1):
        reachable[amount] = any(size <= amount and reachable[amount - size] for size in sizes)
    waste = []
    best = 0
    for amount in range(MILLI_PER_GPU + 1):
        if reachable[amount]:
            best = amount
        waste.append(amount - best)
    return tuple(waste)
