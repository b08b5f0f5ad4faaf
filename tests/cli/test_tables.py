"""Fitting tables to the terminal: the image column is cut first, then the least useful
columns are left out; ids and names are never cut, even when they alone are too wide."""

from __future__ import annotations

import io

from rich.console import Console

from hangar.cli.tables import Col, fit_table, fit_widths

MACHINE = [
    Col("ID", whole=True),
    Col("NAME", whole=True),
    Col("STATE"),
    Col("REGION", drop=1),
    Col("IMAGE", shrink=True),
    Col("UPDATED", drop=0),
]
ROW = [
    "0123456789abcd",
    "inference-worker-with-a-long-name",
    "started",
    "local",
    "registry.example.com:5000/team/model-server@sha256:" + "a" * 64,
    "2026-11-29T10:00:00Z",
]


def render(columns: list[Col], rows: list[list[str]], width: int) -> list[str]:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(fit_table(columns, rows, console))
    output = console.file.getvalue()  # type: ignore[attr-defined]
    return [line.rstrip() for line in output.splitlines()]


def test_at_80_columns_the_image_is_cut_and_ids_are_whole() -> None:
    lines = render(MACHINE, [ROW], 80)
    assert all(len(line) <= 80 for line in lines), lines
    assert ROW[0] in lines[1] and ROW[1] in lines[1] and "started" in lines[1]
    assert lines[1].endswith("…") and "registry.ex" in lines[1]
    assert "UPDATED" not in lines[0]


def test_a_wide_terminal_shows_everything_uncut() -> None:
    lines = render(MACHINE, [ROW], 250)
    assert ROW[4] in lines[1] and ROW[5] in lines[1] and "…" not in lines[1]


def test_columns_are_left_out_in_their_order_once_the_image_is_as_short_as_it_goes() -> None:
    widths = fit_widths(MACHINE, [ROW], 80)
    assert 5 not in widths and 3 in widths and widths[4] == 12
    narrower = fit_widths(MACHINE, [ROW], 72)
    assert 3 not in narrower and 5 not in narrower
    assert narrower[0] == len(ROW[0]) and narrower[1] == len(ROW[1])


def test_ids_wider_than_the_terminal_fold_but_stay_whole() -> None:
    lines = render([Col("ID", whole=True), Col("NAME", whole=True)], [ROW[:2]], 30)
    assert all(len(line) <= 30 for line in lines), lines
    printed = "".join("".join(lines).split())
    assert "…" not in printed
    assert len(printed) == len("IDNAME") + len(ROW[0]) + len(ROW[1])
