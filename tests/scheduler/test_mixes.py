"""Mixes built from the trace lists, and the bench that runs every policy on them."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hangar.bench.trace import app
from hangar.scheduler.bench import run_mix_bench
from hangar.scheduler.mixes import FULL_GRID, QUICK_GRID, MixSpec, build_mix
from hangar.scheduler.trace import TracePod, load_pods

FIXTURES = Path(__file__).parent / "fixtures"
NODES = FIXTURES / "openb_nodes_slice.csv"
PODS_CSV = FIXTURES / "openb_pods_slice.csv"
PODS = load_pods(PODS_CSV)


def counts(pods: list[TracePod]) -> dict[str, int]:
    return {
        "cpu": sum(1 for p in pods if not p.num_gpu),
        "share": sum(1 for p in pods if p.is_share),
        "gpu": sum(1 for p in pods if p.num_gpu),
    }


def multi_percent(pods: list[TracePod]) -> float:
    total = sum(p.gpu_total_milli for p in pods)
    return 100 * sum(p.gpu_total_milli for p in pods if p.num_gpu > 1) / total


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.5])
def test_cpu_only_pods_are_scaled(scale: float) -> None:
    mix = build_mix(PODS, MixSpec(cpu_scale=scale))
    assert counts(mix)["cpu"] == round(counts(PODS)["cpu"] * scale)
    assert counts(mix)["gpu"] == counts(PODS)["gpu"]


@pytest.mark.parametrize("percent", [40, 70, 100])
def test_share_pods_are_a_percentage_of_gpu_pods(percent: int) -> None:
    mix = build_mix(PODS, MixSpec(share_percent=percent))
    assert counts(mix)["gpu"] == counts(PODS)["gpu"]
    assert counts(mix)["share"] == round(counts(PODS)["gpu"] * percent / 100)
    assert counts(mix)["cpu"] == counts(PODS)["cpu"]


@pytest.mark.parametrize("percent", [20, 50])
def test_multi_gpu_pods_reach_a_share_of_the_gpu_demand(percent: int) -> None:
    mix = build_mix(PODS, MixSpec(multi_percent=percent))
    assert percent <= multi_percent(mix) < percent + 10
    singles = sorted(p.name for p in PODS if p.num_gpu == 1)
    assert sorted(p.name for p in mix if p.num_gpu == 1) == singles


def test_mixes_are_deterministic_with_unique_names() -> None:
    for spec in (*FULL_GRID, *QUICK_GRID):
        first, second = build_mix(PODS, spec), build_mix(PODS, spec)
        assert first == second
        assert len({p.name for p in first}) == len(first)


def test_the_full_grid_spans_the_issue_ranges() -> None:
    assert {s.cpu_scale for s in FULL_GRID} == {0.5, 1.0, 1.5, 2.0, 2.5}
    assert {s.share_percent for s in FULL_GRID} - {None} == {40, 60, 80, 100}
    assert {s.multi_percent for s in FULL_GRID} - {None} == {20, 30, 40, 50}
    assert len({s.name for s in FULL_GRID}) == len(FULL_GRID)


@pytest.mark.parametrize(
    "fields",
    [
        {"cpu_scale": -1},
        {"share_percent": 101},
        {"multi_percent": 100},
        {"share_percent": 50, "multi_percent": 20},
    ],
)
def test_bad_mixes_are_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MixSpec(**fields)  # type: ignore[arg-type]


def test_mix_bench_runs_every_policy_on_every_mix() -> None:
    lines: list[str] = []
    result = run_mix_bench(NODES, PODS_CSV, QUICK_GRID, [1, 2], progress=lines.append)
    assert len(lines) == len(QUICK_GRID) * 3 * 2
    assert [m.spec for m in result.mixes] == list(QUICK_GRID)
    for mix in result.mixes:
        assert [p.name for p in mix.policies] == ["hangar", "fgd", "bestfit"]
        assert all(0 < r <= 100 for p in mix.policies for r in p.ratios)
        best_other = max(mix.result("fgd").mean, mix.result("bestfit").mean)
        assert mix.margin == pytest.approx(mix.result("hangar").mean - best_other)
        assert mix.led == (mix.margin > 0)
    table = result.table().splitlines()
    assert f"mixes led: {result.led}/{len(QUICK_GRID)}" in table
    assert table[-2:] == [
        f"ratio hangar/fgd: {result.ratio('fgd'):.3f}",
        f"ratio hangar/bestfit: {result.ratio('bestfit'):.3f}",
    ]
    every = [r for mix in result.mixes for r in mix.result("fgd").ratios]
    assert result.median("fgd") == pytest.approx(statistics.median(every))
    for mix in result.mixes:
        assert any(line.startswith(f"{mix.spec.name}: hangar ") for line in table)


def test_mix_bench_refuses_a_run_without_hangar() -> None:
    with pytest.raises(ValueError):
        run_mix_bench(NODES, PODS_CSV, QUICK_GRID, [1], policies=["fgd", "bestfit"])


def test_mixes_command_quick_json() -> None:
    args = ["mixes", "--nodes", str(NODES), "--pods", str(PODS_CSV), "--quick", "--seeds", "1"]
    result = CliRunner().invoke(app, [*args, "--policies", "hangar,bestfit", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["mixes_total"] == len(QUICK_GRID)
    assert {m["mix"] for m in document["mixes"]} == {s.name for s in QUICK_GRID}
    assert document["mixes_led"] == sum(m["led"] for m in document["mixes"])


def test_mixes_command_needs_lists() -> None:
    assert CliRunner().invoke(app, ["mixes", "--quick"]).exit_code != 0
