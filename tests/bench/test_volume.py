"""``hangar bench volume``: the guest script, the figures and ratios from its lines, and one
real run end to end (its figures are printed, never asserted: speed is measured, not tested)."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest

from hangar.bench.guest import GuestResult
from hangar.bench.volume import DISKS, MEASURES, build_dio, guest_script, parse_samples
from hangar.errors import HangarError

SERIALS = {"volume": "vol_aaaaaaaaaaaaaaaa", "encrypted": "vol_bbbbbbbbbbbbbbbb"}


def result_of(lines: list[str], exit_code: int = 0) -> GuestResult:
    console = "hangar-init: ready\n" + "\n".join(lines) + "\n"
    return GuestResult(console=console, events=[], exit_code=exit_code, error=None)


def test_each_measure_runs_on_every_disk_each_round_in_rotating_order() -> None:
    script = guest_script(2, SERIALS)
    runs = [line.split()[2:5] for line in script.splitlines() if line.startswith("echo bench")]
    assert len(runs) == 2 * len(MEASURES) * len(DISKS)
    firsts = {tuple(runs[i][1:3]) for i in range(0, len(runs), len(DISKS))}
    assert len({disk for disk, _ in firsts}) == len(DISKS)
    assert SERIALS["volume"] in script and SERIALS["encrypted"] in script


def test_medians_and_geometric_mean_ratios() -> None:
    speeds = {"raw": 100.0, "volume": 90.0, "encrypted": 50.0}
    lines = []
    for round_number, jitter in ((1, 1.0), (2, 1.1), (3, 0.2)):
        for disk, speed in speeds.items():
            for measure in MEASURES:
                size = measure.block * measure.count
                micros = int(size / (speed * jitter * (1 << 20)) * 1e6)
                lines.append(f"bench {round_number} {disk} {measure.key} {size} {micros}")
    bench = parse_samples(result_of(lines), 3)
    assert math.isclose(bench.ratio("volume"), 0.9, rel_tol=1e-3)
    assert math.isclose(bench.ratio("encrypted"), 0.5, rel_tol=1e-3)
    report = bench.report().splitlines()
    assert report[-2:] == ["ratio volume/raw: 0.90", "ratio encrypted/raw: 0.50"]


def test_a_failed_guest_is_an_error_not_a_figure() -> None:
    with pytest.raises(HangarError, match="benchmark guest failed"):
        parse_samples(result_of(["bench 1 raw seqread 1048576 1000"], exit_code=1), 1)


def test_the_io_helper_builds_static_and_times_real_io(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    dio = build_dio(tmp_path / "hangar-dio")
    target = tmp_path / "disk.img"
    with target.open("wb") as sparse:
        sparse.truncate(8 << 20)
    ldd = subprocess.run(["ldd", dio], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr  # runs in any image
    for mode in ("seqwrite", "randread"):
        out = subprocess.run(
            [dio, mode, target, "4096", "64", str(8 << 20), "7"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out[:2] == [mode, str(64 * 4096)] and int(out[2]) >= 0
    assert target.read_bytes()[:4096] != b"\0" * 4096, "writes carry data, not zeros"
    bad = subprocess.run([dio, "seqwrite", target, "1000", "1", "4096", "1"], capture_output=True)
    assert bad.returncode == 2


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    if shutil.which("gcc") is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("gcc and QEMU are needed")
    from hangar.bench.volume import volume_bench

    report = volume_bench(1, folder=tmp_path)
    print(report)
    lines = report.splitlines()
    assert lines[-2].startswith("ratio volume/raw: ")
    assert lines[-1].startswith("ratio encrypted/raw: ")
    assert float(lines[-1].split(": ")[1]) > 0
    assert list(tmp_path.iterdir()) == []
