"""Request mixes built from the trace's pod lists, for checking a policy on every kind of mix.

The FGD paper varies its default pod list along three axes; ``build_mix`` does the same,
deterministically (one fixed random stream per mix, independent of the run's seeds):

- ``cpu_scale``: CPU-only pods scaled (0.5x keeps half of them, 2.5x repeats them);
- ``share_percent``: share pods as a percentage of the GPU pods, by count (the number of GPU pods
  is kept; shares and non-shares are drawn from the list's own shares and non-shares);
- ``multi_percent``: multi-GPU pods' share of the GPU demand (single-GPU pods are kept and
  multi-GPU pods are drawn from the lists' multi-GPU pods until they reach it).

An axis left at ``None`` keeps the default list's value.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hangar.scheduler.trace import TracePod


@dataclass(frozen=True, slots=True)
class MixSpec:
    cpu_scale: float = 1.0
    share_percent: float | None = None
    multi_percent: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.cpu_scale <= 10:
            raise ValueError(f"cpu_scale {self.cpu_scale} is outside 0..10")
        if self.share_percent is not None and not 0 <= self.share_percent <= 100:
            raise ValueError(f"share_percent {self.share_percent} is outside 0..100")
        if self.multi_percent is not None and not 0 <= self.multi_percent < 100:
            raise ValueError(f"multi_percent {self.multi_percent} is outside 0..99")
        if self.share_percent is not None and self.multi_percent is not None:
            raise ValueError("vary shares or multi-GPU pods, not both")

    @property
    def name(self) -> str:
        parts = [f"cpu{self.cpu_scale:g}x"]
        if self.share_percent is not None:
            parts.append(f"share{self.share_percent:g}")
        if self.multi_percent is not None:
            parts.append(f"multi{self.multi_percent:g}")
        return "-".join(parts)


FULL_GRID: tuple[MixSpec, ...] = (
    *(MixSpec(cpu_scale=scale) for scale in (0.5, 1.0, 1.5, 2.0, 2.5)),
    *(MixSpec(share_percent=percent) for percent in (40, 60, 80, 100)),
    *(MixSpec(multi_percent=percent) for percent in (20, 30, 40, 50)),
    MixSpec(cpu_scale=2.5, share_percent=100),
    MixSpec(cpu_scale=2.5, multi_percent=50),
)
"""Each axis over the issue's range with the others at the default list's values, and the two
CPU-heavy corners."""
QUICK_GRID: tuple[MixSpec, ...] = (
    MixSpec(cpu_scale=2.5),
    MixSpec(share_percent=100),
    MixSpec(multi_percent=50),
)


def build_mix(
    pods: Sequence[TracePod], spec: MixSpec, multi_pool: Sequence[TracePod] = ()
) -> list[TracePod]:
    """The pod list ``spec`` describes, built from ``pods`` (and multi-GPU pods drawn from
    ``pods`` plus ``multi_pool``). Deterministic: the same inputs give the same list."""
    rng = random.Random(f"mix-{spec.name}")
    cpu = [pod for pod in pods if not pod.num_gpu]
    shares = [pod for pod in pods if pod.is_share]
    singles = [pod for pod in pods if pod.num_gpu == 1 and not pod.is_share]
    multi = [pod for pod in pods if pod.num_gpu > 1]
    gpu_pods = [*shares, *singles, *multi]
    if not gpu_pods:
        raise ValueError("the pod list has no GPU pods")
    if spec.share_percent is not None:
        count = len(gpu_pods)
        wanted_shares = round(count * spec.share_percent / 100)
        if wanted_shares and not shares:
            raise ValueError("the pod list has no share pods to scale")
        others = [*singles, *multi]
        if wanted_shares < count and not others:
            raise ValueError("the pod list has only share pods")
        gpu_pods = [*_draw(shares, wanted_shares, rng), *_draw(others, count - wanted_shares, rng)]
    elif spec.multi_percent is not None:
        pool = [*multi, *(pod for pod in multi_pool if pod.num_gpu > 1)]
        if not pool:
            raise ValueError("no multi-GPU pods to draw from")
        single_demand = sum(pod.gpu_total_milli for pod in [*shares, *singles])
        target = spec.multi_percent / (100 - spec.multi_percent) * single_demand
        chosen: list[TracePod] = []
        demand = 0
        order = list(pool)
        rng.shuffle(order)
        while demand < target:
            pod = order[len(chosen) % len(order)]
            chosen.append(pod)
            demand += pod.gpu_total_milli
        gpu_pods = [*shares, *singles, *chosen]
    cpu_pods = _draw(cpu, round(len(cpu) * spec.cpu_scale), rng)
    mixed = [*gpu_pods, *cpu_pods]
    return _unique_names(mixed)


def _draw(pods: Sequence[TracePod], count: int, rng: random.Random) -> list[TracePod]:
    """``count`` pods: whole copies of ``pods``, then a sample without replacement."""
    if not pods:
        return []
    copies, rest = divmod(count, len(pods))
    return [*(pod for _ in range(copies) for pod in pods), *rng.sample(list(pods), rest)]


def _unique_names(pods: Sequence[TracePod]) -> list[TracePod]:
    seen: dict[str, int] = {}
    named = []
    for pod in pods:
        copy = seen.get(pod.name, 0)
        seen[pod.name] = copy + 1
        named.append(pod if not copy else replace(pod, name=f"{pod.name}-{copy}"))
    return named
