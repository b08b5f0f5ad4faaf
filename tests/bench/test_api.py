"""``hangar bench api``: its sizes, its report, and one small real run end to end (figures
printed, never asserted: speed is measured, not tested)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hangar.bench.api import OPERATIONS, ApiBenchResult, parse_sizes, run_api_bench
from hangar.cli.main import app


def test_sizes_grow_and_stay_in_range() -> None:
    assert parse_sizes("100,1000,10_000") == (100, 1000, 10000)
    assert parse_sizes("7") == (7,)
    for bad in ("", "100,,1000", "ten", "0,10", "100,100", "1000,100", "100,200000"):
        with pytest.raises(ValueError, match="sizes"):
            parse_sizes(bad)


def test_the_report_has_a_row_per_size_and_the_create_ratio_last() -> None:
    def row(create_ms: float) -> dict[str, list[float]]:
        return {
            "create": [create_ms / 1000, 1.0, 0.001],
            "get": [0.001, 0.002, 0.003],
            "list": [0.01, 0.02, 0.03],
            "page": [0.004, 0.004, 0.004],
        }

    result = ApiBenchResult(
        {100: row(4.0), 1000: row(5.0), 10000: row(6.0)},
        cpu={100: row(2.0), 1000: row(2.0), 10000: row(2.2)},
        fill_s=2.5,
    )

    lines = result.report().splitlines()

    assert lines[0].split()[:3] == ["machines", "create", "p50"]
    assert lines[1].split()[:5] == ["100", "4.00", "ms", "2.00", "ms"]
    assert lines[3].startswith("     10000       6.00 ms")
    assert lines[4].split()[:3] == ["cpu", "create", "p50"]
    assert lines[7].startswith("     10000       2.20 ms")
    assert "filled 10000 machines in the store in 2.5s" in lines
    assert lines[-4:] == [
        "ratio get 10000/100: 1.00",
        "ratio list 100 10000/100: 1.00",
        "ratio create cpu 10000/100: 1.10",
        "ratio create 10000/100: 1.50",
    ]
    without_cpu = ApiBenchResult({100: row(4.0), 10000: row(6.0)}).report().splitlines()
    assert "cpu" not in " ".join(without_cpu)
    assert without_cpu[-1] == "ratio create 10000/100: 1.50"


def test_the_command_refuses_bad_sizes_naming_the_option() -> None:
    result = CliRunner().invoke(app, ["bench", "api", "--sizes", "100,50"])

    assert result.exit_code == 2
    assert "--sizes" in result.output


def test_a_small_run_measures_every_operation_at_each_size(tmp_path: Path) -> None:
    result = run_api_bench((4, 12), samples=3, scratch=tmp_path)

    print(result.report())
    assert sorted(result.samples) == [4, 12]
    for size in (4, 12):
        for operation in OPERATIONS:
            samples = result.samples[size][operation]
            assert len(samples) >= 3 and all(seconds > 0 for seconds in samples)
    assert result.report().splitlines()[-1].startswith("ratio create 12/4: ")
