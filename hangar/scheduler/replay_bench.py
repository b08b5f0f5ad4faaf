"""``hangar bench replay``: both platforms of ``replay`` on several seeds, side by side.

Seeds run one after another, or spread over worker processes (``jobs``); each seed's result is
a deterministic function of the seed, so both ways give the same figures.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hangar.scheduler.replay import (
    FLY,
    HANGAR,
    PLATFORMS,
    ReplayConfig,
    SeedOutcome,
    replay_seed,
    timed_pods,
)
from hangar.scheduler.trace import TracePod, load_nodes, load_pods


@dataclass(frozen=True, slots=True)
class PlatformSummary:
    platform: str
    allocation: float
    """Mean over the seeds, as the other columns."""
    median_allocation: float
    """Median over the seeds: what the ratio compares."""
    held: float
    waited_percent: float
    refused_percent: float
    waited_or_refused: float
    gpu_requests: int
    refused: int
    slices: int


@dataclass(frozen=True, slots=True)
class ReplayBenchResult:
    nodes_csv: str
    pods_csv: str
    config: ReplayConfig
    seeds: tuple[SeedOutcome, ...]
    gpu_hosts: int
    gpus: int
    cpu_hosts: int
    pods: int

    def summary(self, platform: str) -> PlatformSummary:
        outcomes = [seed.outcome(platform) for seed in self.seeds]
        return PlatformSummary(
            platform=platform,
            allocation=statistics.fmean(o.allocation for o in outcomes),
            median_allocation=statistics.median(o.allocation for o in outcomes),
            held=statistics.fmean(o.held for o in outcomes),
            waited_percent=statistics.fmean(o.waited_percent for o in outcomes),
            refused_percent=statistics.fmean(o.refused_percent for o in outcomes),
            waited_or_refused=statistics.fmean(o.waited_or_refused for o in outcomes),
            gpu_requests=sum(o.gpu_requests for o in outcomes),
            refused=sum(o.refused for o in outcomes),
            slices=sum(o.slices for o in outcomes),
        )

    @property
    def ratio(self) -> float:
        """Time-averaged GPU allocation, hangar over fly-style (medians over the seeds)."""
        fly = self.summary(FLY).median_allocation
        return self.summary(HANGAR).median_allocation / fly if fly else 0.0

    def table(self) -> str:
        config = self.config
        compression = statistics.fmean(seed.compression for seed in self.seeds)
        lines = [
            "replay of the trace with arrivals and departures, both platforms on the same stream",
            f"nodes {self.nodes_csv} ({self.gpu_hosts} GPU hosts with {self.gpus} GPUs, "
            f"{self.cpu_hosts} CPU-only hosts)",
            f"pods  {self.pods_csv} ({self.pods} pods with creation and deletion times)",
            f"seeds {', '.join(str(seed.seed) for seed in self.seeds)}",
            f"stream: {config.passes} passes over the list's arrival times "
            f"({config.warmup_passes} warm-up, not measured); each arrival draws a pod, shape "
            "and lifetime, from the list; lifetimes as listed; arrival clock compressed "
            f"x{compression:.0f} (mean) so the offered GPU demand averages "
            f"{config.load * 100:g} % of the GPUs over the measured window",
            *config.describe(),
            "allocation: GPU capacity the running requests asked for (a share counts its share "
            "even where it holds a whole GPU), time-averaged, % of all GPUs; held: GPUs held; "
            "columns: means over the seeds",
            "",
            f"{'platform':<11}{'alloc %':>9}{'held %':>8}{'waited %':>10}{'refused %':>11}"
            f"{'waited|refused %':>18}{'refused':>9}{'slices':>8}",
        ]
        for platform in PLATFORMS:
            s = self.summary(platform)
            lines.append(
                f"{platform:<11}{s.allocation:>9.2f}{s.held:>8.2f}{s.waited_percent:>10.2f}"
                f"{s.refused_percent:>11.2f}{s.waited_or_refused:>18.2f}{s.refused:>9}"
                f"{s.slices:>8}"
            )
        lines.append("")
        for seed in self.seeds:
            theirs, mine = seed.outcome(FLY), seed.outcome(HANGAR)
            lines.append(
                f"seed {seed.seed}: alloc {mine.allocation:.2f} vs {theirs.allocation:.2f}, "
                f"refused {mine.refused} vs {theirs.refused} of {mine.gpu_requests} GPU requests, "
                f"waited or refused {mine.waited_or_refused:.1f} % "
                f"vs {theirs.waited_or_refused:.1f} %"
            )
        fly, ours = self.summary(FLY), self.summary(HANGAR)
        fewer = (
            "fewer"
            if ours.refused < fly.refused
            else "as many"
            if ours.refused == fly.refused
            else "more"
        )
        lines += [
            "",
            f"median alloc % over the seeds: hangar {ours.median_allocation:.2f}, "
            f"fly-style {fly.median_allocation:.2f}",
            f"refused GPU requests, hangar vs fly-style: {ours.refused} vs {fly.refused} ({fewer})",
            f"ratio hangar/fly-style: {self.ratio:.2f}",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes_csv,
            "pods": self.pods_csv,
            "config": {
                "passes": self.config.passes,
                "warmup_passes": self.config.warmup_passes,
                "load": self.config.load,
                "max_queue": self.config.max_queue,
                "max_wait_s": self.config.max_wait_s,
                "mig_model": self.config.mig_model,
                "mig_kind": self.config.mig_kind,
                "mig_fraction": self.config.mig_fraction,
                "mig_layout": list(self.config.mig_layout),
                "slice_percent": self.config.slice_percent,
            },
            "seeds": [seed.to_json() for seed in self.seeds],
            "summary": {
                platform: {
                    "allocation_percent": round(s.allocation, 3),
                    "median_allocation_percent": round(s.median_allocation, 3),
                    "held_percent": round(s.held, 3),
                    "waited_percent": round(s.waited_percent, 3),
                    "refused_percent": round(s.refused_percent, 3),
                    "waited_or_refused_percent": round(s.waited_or_refused, 3),
                    "refused": s.refused,
                    "gpu_requests": s.gpu_requests,
                    "slices": s.slices,
                }
                for platform in PLATFORMS
                for s in [self.summary(platform)]
            },
            "ratio_hangar_over_fly_style": round(self.ratio, 4),
        }


def run_replay_bench(
    nodes_csv: Path,
    pods_csv: Path,
    seeds: Sequence[int],
    config: ReplayConfig | None = None,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
    pods: Sequence[TracePod] | None = None,
) -> ReplayBenchResult:
    """Both platforms on every seed. ``pods`` replaces the list read from ``pods_csv`` (a mix
    built from it, for one)."""
    config = config or ReplayConfig()
    nodes = load_nodes(nodes_csv)
    listed = timed_pods(pods if pods is not None else load_pods(pods_csv))
    outcomes: dict[int, SeedOutcome] = {}
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {
                seed: pool.submit(replay_seed, nodes, listed, seed, config) for seed in seeds
            }
            for seed, future in futures.items():
                outcomes[seed] = future.result()
                _report(progress, outcomes[seed])
    else:
        for seed in seeds:
            outcomes[seed] = replay_seed(nodes, listed, seed, config)
            _report(progress, outcomes[seed])
    return ReplayBenchResult(
        nodes_csv=str(nodes_csv),
        pods_csv=str(pods_csv),
        config=config,
        seeds=tuple(outcomes[seed] for seed in seeds),
        gpu_hosts=sum(1 for node in nodes if node.gpus),
        gpus=sum(node.gpus for node in nodes),
        cpu_hosts=sum(1 for node in nodes if not node.gpus),
        pods=len(listed),
    )


def _report(progress: Callable[[str], None] | None, outcome: SeedOutcome) -> None:
    if progress is not None:
        fly, ours = outcome.outcome(FLY), outcome.outcome(HANGAR)
        progress(
            f"seed {outcome.seed}: hangar {ours.allocation:.2f} %, fly-style {fly.allocation:.2f} %"
        )
