"""Placement benchmarks: policy quality on a real trace, and placement throughput.

``run_trace_bench`` replays the FGD paper's experiment (``sim.replay``) for every policy on
the same per-seed workloads and reports the GPU allocation ratio at 100 % arrival;
``run_mix_bench`` does the same on mixes built from the lists (``mixes``) and says on which
hangar leads every other policy.
``run_throughput_bench`` places a synthetic request stream on a synthetic fleet through the
real ``Scheduler`` and ``InMemoryClaimStore`` (index search, claim, compare-and-set).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hangar.errors import InsufficientCapacity
from hangar.scheduler.claims import ClaimStore, InMemoryClaimStore
from hangar.scheduler.mixes import MixSpec, build_mix
from hangar.scheduler.model import HostState
from hangar.scheduler.profile import WorkloadProfile
from hangar.scheduler.scheduler import Scheduler
from hangar.scheduler.sim import POLICIES, replay
from hangar.scheduler.synthetic import synthetic_hosts, synthetic_requests
from hangar.scheduler.trace import TraceNode, TracePod, load_nodes, load_pods

DEFAULT_POLICIES = ("random", "bestfit", "gpupacking", "dotprod", "hangar")
PROFILE_SAMPLE = 10_000
"""Requests of the throughput stream the scheduler's workload profile is learnt from."""


@dataclass(frozen=True, slots=True)
class PolicyResult:
    name: str
    ratios: tuple[float, ...]
    """GPU allocation ratio (%) at 100 % arrival, one per seed."""
    seconds: float

    @property
    def mean(self) -> float:
        return statistics.fmean(self.ratios)


@dataclass(frozen=True, slots=True)
class TraceBenchResult:
    nodes_csv: str
    pods_csv: str
    seeds: tuple[int, ...]
    policies: tuple[PolicyResult, ...]

    def result(self, name: str) -> PolicyResult | None:
        return next((p for p in self.policies if p.name == name), None)

    def unallocated_ratio(self, policy: str = "hangar", baseline: str = "bestfit") -> float | None:
        """``policy``'s unallocated GPU share over ``baseline``'s (lower is better)."""
        ours, theirs = self.result(policy), self.result(baseline)
        if ours is None or theirs is None or theirs.mean >= 100.0:
            return None
        return (100.0 - ours.mean) / (100.0 - theirs.mean)

    def table(self) -> str:
        lines = [
            f"nodes {self.nodes_csv}",
            f"pods  {self.pods_csv}",
            f"seeds {', '.join(str(seed) for seed in self.seeds)}",
            "",
            f"{'policy':<12}{'alloc %':>9}{'min':>8}{'max':>8}{'seconds':>9}",
        ]
        for policy in self.policies:
            lines.append(
                f"{policy.name:<12}{policy.mean:>9.2f}{min(policy.ratios):>8.2f}"
                f"{max(policy.ratios):>8.2f}{policy.seconds:>9.1f}"
            )
        ratio = self.unallocated_ratio()
        hangar, bestfit = self.result("hangar"), self.result("bestfit")
        if ratio is not None and hangar is not None and bestfit is not None:
            lines.append("")
            lines.append(
                f"unallocated GPUs, hangar / BestFit: {ratio:.3f} "
                f"({100 - hangar.mean:.2f} % vs {100 - bestfit.mean:.2f} %)"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes_csv,
            "pods": self.pods_csv,
            "seeds": list(self.seeds),
            "policies": [
                {
                    "name": policy.name,
                    "mean": round(policy.mean, 4),
                    "ratios": [round(ratio, 4) for ratio in policy.ratios],
                    "seconds": round(policy.seconds, 2),
                }
                for policy in self.policies
            ],
            "hangar_unallocated_over_bestfit": self.unallocated_ratio(),
        }


def run_trace_bench(
    nodes_csv: Path,
    pods_csv: Path,
    seeds: Sequence[int],
    policies: Sequence[str] = DEFAULT_POLICIES,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> TraceBenchResult:
    """Every policy on the same workloads (one per seed). ``jobs`` > 1 spreads the runs over
    worker processes; each run is still a deterministic function of its seed."""
    unknown = [name for name in policies if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {sorted(POLICIES)}")
    nodes = load_nodes(nodes_csv)
    pods = load_pods(pods_csv)
    runs = [(name, seed) for name in policies for seed in seeds]
    outcomes: dict[tuple[str, int], tuple[float, float]] = {}
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {run: pool.submit(_timed_replay, nodes, pods, *run) for run in runs}
            for run, future in futures.items():
                outcomes[run] = future.result()
                _report(progress, run, outcomes[run])
    else:
        for run in runs:
            outcomes[run] = _timed_replay(nodes, pods, *run)
            _report(progress, run, outcomes[run])
    return TraceBenchResult(
        nodes_csv=str(nodes_csv),
        pods_csv=str(pods_csv),
        seeds=tuple(seeds),
        policies=tuple(
            PolicyResult(
                name,
                tuple(outcomes[(name, seed)][0] for seed in seeds),
                sum(outcomes[(name, seed)][1] for seed in seeds),
            )
            for name in policies
        ),
    )


def _timed_replay(
    nodes: Sequence[TraceNode], pods: Sequence[TracePod], name: str, seed: int
) -> tuple[float, float]:
    started = time.perf_counter()
    ratio = replay(nodes, pods, seed, POLICIES[name])
    return ratio, time.perf_counter() - started


def _report(
    progress: Callable[[str], None] | None, run: tuple[str, int], outcome: tuple[float, float]
) -> None:
    """One progress line per finished run."""
    if progress is not None:
        progress(f"{run[0]} seed {run[1]}: {outcome[0]:.2f} % ({outcome[1]:.1f} s)")


@dataclass(frozen=True, slots=True)
class ThroughputResult:
    hosts: int
    machines: int
    placed: int
    rejected: int
    seconds: float
    setup_seconds: float

    @property
    def placements_per_s(self) -> float:
        return self.machines / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.placements_per_s:.0f} placements/s "
            f"({self.machines} requests on {self.hosts} hosts in {self.seconds:.2f} s: "
            f"{self.placed} placed, {self.rejected} insufficient_capacity; "
            f"setup {self.setup_seconds:.2f} s)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "hosts": self.hosts,
            "machines": self.machines,
            "placed": self.placed,
            "rejected": self.rejected,
            "seconds": round(self.seconds, 3),
            "setup_seconds": round(self.setup_seconds, 3),
            "placements_per_s": round(self.placements_per_s, 1),
        }


def run_throughput_bench(
    hosts: int,
    machines: int,
    seed: int = 0,
    store_factory: Callable[[list[HostState]], ClaimStore] = InMemoryClaimStore,
) -> ThroughputResult:
    """Place ``machines`` requests one at a time with claims; time the placement loop.
    ``store_factory`` gives the claim store the hosts are registered in (the embedded
    server's SQLite store, or the in-memory one)."""
    started = time.perf_counter()
    store = store_factory(synthetic_hosts(hosts, seed))
    requests = synthetic_requests(machines, seed)
    profile = WorkloadProfile.from_requests(requests[:PROFILE_SAMPLE])
    scheduler = Scheduler(store, profile)
    setup = time.perf_counter() - started
    placed = rejected = 0
    started = time.perf_counter()
    for request in requests:
        try:
            scheduler.place(request)
            placed += 1
        except InsufficientCapacity:
            rejected += 1
    elapsed = time.perf_counter() - started
    return ThroughputResult(hosts, machines, placed, rejected, elapsed, setup)


MIX_POLICIES = ("hangar", "fgd", "bestfit")


@dataclass(frozen=True, slots=True)
class MixResult:
    spec: MixSpec
    pods: int
    policies: tuple[PolicyResult, ...]

    def result(self, name: str) -> PolicyResult:
        return next(p for p in self.policies if p.name == name)

    @property
    def margin(self) -> float:
        """hangar's mean allocation minus the best other policy's (points)."""
        others = [p.mean for p in self.policies if p.name != "hangar"]
        return self.result("hangar").mean - max(others)

    @property
    def led(self) -> bool:
        return self.margin > 0


@dataclass(frozen=True, slots=True)
class MixBenchResult:
    nodes_csv: str
    pods_csv: str
    multi_csv: str | None
    seeds: tuple[int, ...]
    mixes: tuple[MixResult, ...]

    @property
    def led(self) -> int:
        return sum(1 for mix in self.mixes if mix.led)

    def _policy_names(self) -> list[str]:
        return [p.name for p in self.mixes[0].policies] if self.mixes else []

    def table(self) -> str:
        names = self._policy_names()
        lines = [
            f"nodes {self.nodes_csv}",
            f"pods  {self.pods_csv}"
            + (f" (multi-GPU pods also from {self.multi_csv})" if self.multi_csv else ""),
            f"seeds {', '.join(str(seed) for seed in self.seeds)}",
            "GPU allocation % at 100 % arrival (FGD paper's method), mean over the seeds",
            "",
            f"{'mix':<22}{'pods':>7}" + "".join(f"{name:>10}" for name in names) + f"{'margin':>9}",
        ]
        for mix in self.mixes:
            lines.append(
                f"{mix.spec.name:<22}{mix.pods:>7}"
                + "".join(f"{mix.result(name).mean:>10.2f}" for name in names)
                + f"{mix.margin:>+9.2f}"
            )
        lines.append("")
        for mix in self.mixes:
            ours = mix.result("hangar")
            versus = ", ".join(
                f"{p.name} {p.mean:.2f} ({ours.mean - p.mean:+.2f}, "
                f"{sum(a > b for a, b in zip(ours.ratios, p.ratios, strict=True))}"
                f"/{len(self.seeds)} seeds)"
                for p in mix.policies
                if p.name != "hangar"
            )
            verdict = "leads" if mix.led else "does not lead"
            lines.append(f"{mix.spec.name}: hangar {ours.mean:.2f} vs {versus}: {verdict}")
        lines += ["", f"mixes led: {self.led}/{len(self.mixes)}"]
        if "hangar" in names:
            medians = ", ".join(f"{name} {self.median(name):.2f}" for name in names)
            lines.append(f"median allocation % over every mix and seed: {medians}")
            lines += [
                f"ratio hangar/{name}: {self.ratio(name):.3f}" for name in names if name != "hangar"
            ]
        return "\n".join(lines)

    def median(self, policy: str) -> float:
        """``policy``'s GPU allocation %, median over every mix and seed."""
        return statistics.median(r for mix in self.mixes for r in mix.result(policy).ratios)

    def ratio(self, baseline: str) -> float:
        """hangar's median allocation over ``baseline``'s."""
        theirs = self.median(baseline)
        return self.median("hangar") / theirs if theirs else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes_csv,
            "pods": self.pods_csv,
            "multi_pods": self.multi_csv,
            "seeds": list(self.seeds),
            "mixes": [
                {
                    "mix": mix.spec.name,
                    "pods": mix.pods,
                    "led": mix.led,
                    "margin": round(mix.margin, 4),
                    "policies": {
                        p.name: {
                            "mean": round(p.mean, 4),
                            "ratios": [round(r, 4) for r in p.ratios],
                        }
                        for p in mix.policies
                    },
                }
                for mix in self.mixes
            ],
            "mixes_led": self.led,
            "mixes_total": len(self.mixes),
            "median_allocation_percent": {
                name: round(self.median(name), 4) for name in self._policy_names()
            },
        }


def run_mix_bench(
    nodes_csv: Path,
    pods_csv: Path,
    mixes: Sequence[MixSpec],
    seeds: Sequence[int],
    multi_csv: Path | None = None,
    policies: Sequence[str] = MIX_POLICIES,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
) -> MixBenchResult:
    """Every policy on every mix (built by ``mixes.build_mix``), the same workloads per seed."""
    if "hangar" not in policies or len(policies) < 2:
        raise ValueError("compare hangar with at least one other policy")
    unknown = [name for name in policies if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {sorted(POLICIES)}")
    nodes = load_nodes(nodes_csv)
    pods = load_pods(pods_csv)
    pool = load_pods(multi_csv) if multi_csv is not None else []
    lists = {spec: build_mix(pods, spec, pool) for spec in mixes}
    runs = [(spec, name, seed) for spec in mixes for name in policies for seed in seeds]
    outcomes: dict[tuple[MixSpec, str, int], tuple[float, float]] = {}
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as executor:
            futures = {
                run: executor.submit(_timed_replay, nodes, lists[run[0]], run[1], run[2])
                for run in runs
            }
            for run, future in futures.items():
                outcomes[run] = future.result()
                _report(progress, (f"{run[0].name} {run[1]}", run[2]), outcomes[run])
    else:
        for run in runs:
            outcomes[run] = _timed_replay(nodes, lists[run[0]], run[1], run[2])
            _report(progress, (f"{run[0].name} {run[1]}", run[2]), outcomes[run])
    return MixBenchResult(
        nodes_csv=str(nodes_csv),
        pods_csv=str(pods_csv),
        multi_csv=str(multi_csv) if multi_csv is not None else None,
        seeds=tuple(seeds),
        mixes=tuple(
            MixResult(
                spec,
                len(lists[spec]),
                tuple(
                    PolicyResult(
                        name,
                        tuple(outcomes[(spec, name, seed)][0] for seed in seeds),
                        sum(outcomes[(spec, name, seed)][1] for seed in seeds),
                    )
                    for name in policies
                ),
            )
            for spec in mixes
        ),
    )
