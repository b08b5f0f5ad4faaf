"""The boot bench's report and its resume measurement's notion of a new console line."""

from __future__ import annotations

from pathlib import Path

from hangar.bench.boot import BootBenchResult, _new_line_after


def test_the_report_has_a_row_and_a_ratio_line_for_resume() -> None:
    result = BootBenchResult(
        plain_qemu_s=[2.0, 3.0, 4.0],
        hangar_start_s=[3.0, 3.3, 3.6],
        hangar_create_s=[4.0, 4.0, 4.0],
        resume_s=[0.3, 0.33, 0.9],
    )

    lines = result.report().splitlines()

    assert lines[4].startswith("(d) hangar start of a suspended machine (API)")
    assert "0.330s" in lines[4]
    assert lines[-2:] == ["ratio hangar/qemu: 1.10", "ratio resume/qemu: 0.11"]


def test_without_resume_samples_there_is_no_resume_row() -> None:
    result = BootBenchResult([2.0], [2.0], [2.0])

    assert "resume" not in result.report()


def test_only_a_whole_line_begun_after_the_offset_counts(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"tick\nti")
    offset = console.stat().st_size

    console.write_bytes(b"tick\ntick\n")  # the line begun before the offset ends
    assert not _new_line_after(console, offset)
    console.write_bytes(b"tick\ntick\ntick\n")
    assert _new_line_after(console, offset)

    console.write_bytes(b"tick\n")
    assert not _new_line_after(console, 5)
    console.write_bytes(b"tick\ntick\n")
    assert _new_line_after(console, 5)
    assert _new_line_after(console, 0)


def test_the_sandbox_rows_end_with_their_own_ratio() -> None:
    result = BootBenchResult(
        plain_qemu_s=[2.0],
        hangar_start_s=[2.0],
        hangar_create_s=[2.0],
        resume_s=[0.5],
        sandbox_start_s=[0.8, 1.0, 1.2],
        sandbox_resume_s=[0.25, 0.3, 0.35],
    )

    lines = result.report().splitlines()

    assert lines[5].startswith("(e) sandbox (runsc) start of a stopped machine")
    assert lines[6].startswith("(f) sandbox start of a suspended machine") and "0.300s" in lines[6]
    assert lines[-1] == "ratio sandbox resume/start: 0.30"
