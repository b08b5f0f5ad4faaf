from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hangar.bench.placement import app, parse_seeds
from hangar.scheduler.bench import run_throughput_bench, run_trace_bench

FIXTURES = Path(__file__).parent / "fixtures"
NODES = FIXTURES / "openb_nodes_slice.csv"
PODS = FIXTURES / "openb_pods_slice.csv"


def test_trace_bench_runs_every_policy_on_the_same_seeds() -> None:
    lines: list[str] = []
    result = run_trace_bench(NODES, PODS, [1, 2], progress=lines.append)
    names = [policy.name for policy in result.policies]
    assert names == ["random", "bestfit", "gpupacking", "dotprod", "hangar"]
    assert all(len(policy.ratios) == 2 for policy in result.policies)
    assert len(lines) == 10
    hangar, bestfit = result.result("hangar"), result.result("bestfit")
    assert hangar is not None and bestfit is not None
    ratio = result.unallocated_ratio()
    assert ratio == pytest.approx((100 - hangar.mean) / (100 - bestfit.mean))
    table = result.table()
    assert any(line.startswith("hangar") for line in table.splitlines())
    assert "hangar / BestFit" in table


def test_trace_bench_in_worker_processes_gives_the_same_numbers() -> None:
    alone = run_trace_bench(NODES, PODS, [3], ["bestfit", "hangar"])
    spread = run_trace_bench(NODES, PODS, [3], ["bestfit", "hangar"], jobs=2)
    assert [p.ratios for p in alone.policies] == [p.ratios for p in spread.policies]


def test_unknown_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        run_trace_bench(NODES, PODS, [1], ["tetris"])


def test_throughput_bench_places_through_the_claim_store() -> None:
    result = run_throughput_bench(hosts=200, machines=2000)
    assert result.placed + result.rejected == 2000
    assert result.placed > 1500
    assert result.placements_per_s > 0
    assert "placements/s" in result.summary()


def test_cli_prints_the_table_or_json() -> None:
    runner = CliRunner()
    args = ["placement", "--nodes", str(NODES), "--pods", str(PODS), "--seeds", "1..2"]
    table = runner.invoke(app, [*args, "--policies", "bestfit,hangar"])
    assert table.exit_code == 0, table.output
    assert any(line.startswith("hangar") for line in table.stdout.splitlines())
    as_json = runner.invoke(app, [*args, "--policies", "bestfit,hangar", "--json"])
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.stdout)
    assert [p["name"] for p in document["policies"]] == ["bestfit", "hangar"]
    assert document["seeds"] == [1, 2]
    assert document["hangar_unallocated_over_bestfit"] > 0


def test_cli_throughput_mode() -> None:
    result = CliRunner().invoke(
        app, ["placement", "--synthetic-hosts", "100", "--machines", "500", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["machines"] == 500


def test_cli_needs_a_trace_or_a_fleet() -> None:
    result = CliRunner().invoke(app, ["placement"])
    assert result.exit_code != 0


@pytest.mark.parametrize(
    ("text", "seeds"), [("42..45", [42, 43, 44, 45]), ("1,3", [1, 3]), ("7", [7])]
)
def test_seed_ranges(text: str, seeds: list[int]) -> None:
    assert parse_seeds(text) == seeds


def test_empty_seed_ranges_are_refused() -> None:
    with pytest.raises(typer.BadParameter):
        parse_seeds("5..4")
