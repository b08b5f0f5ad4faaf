"""Tables that fit the terminal without cutting what a person copies: ids and names are
printed whole, always. To fit, the table first narrows its one shrinkable column (an image
reference: cut with an ellipsis), then leaves out the columns that matter least, in their
stated order; only if ids alone are wider than the terminal do they fold onto a second line
(still whole)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

GAP = 2
"""Columns are separated by two spaces (no borders: copy-paste friendly)."""


@dataclass(frozen=True)
class Col:
    header: str
    whole: bool = False
    """Never cut (ids, names): folded onto another line rather than shortened."""
    shrink: bool = False
    """Cut first, with an ellipsis, down to ``min_width`` (image references)."""
    drop: int | None = None
    """Left out to fit when still too wide; lower numbers go first. None: always shown."""
    min_width: int = 12


def _width(cell: str) -> int:
    return max((Text.from_markup(line).cell_len for line in cell.splitlines()), default=0)


def fit_widths(columns: Sequence[Col], rows: Sequence[Sequence[str]], width: int) -> dict[int, int]:
    """Column index -> width, for the columns shown (in order), to fit ``width`` cells."""
    natural = {
        index: max([_width(column.header), *(_width(row[index]) for row in rows)])
        for index, column in enumerate(columns)
    }

    def total(widths: dict[int, int]) -> int:
        return sum(widths.values()) + GAP * (len(widths) - 1)

    widths = dict(natural)
    for index, column in enumerate(columns):
        excess = total(widths) - width
        if column.shrink and excess > 0:
            widths[index] = max(min(column.min_width, natural[index]), natural[index] - excess)
    droppable = sorted(
        (column.drop, index) for index, column in enumerate(columns) if column.drop is not None
    )
    for _priority, index in droppable:
        if total(widths) <= width:
            break
        del widths[index]
    return widths


def fit_table(
    columns: Sequence[Col],
    rows: Sequence[Sequence[str]],
    console: Console,
    title: str | None = None,
) -> Table:
    widths = fit_widths(columns, rows, console.width)
    table = Table(
        box=None,
        padding=(0, GAP // 2),
        pad_edge=False,
        show_edge=False,
        header_style="bold",
        title=title,
        title_justify="left",
    )
    shown = sorted(widths)
    for index in shown:
        column = columns[index]
        table.add_column(
            column.header,
            width=widths[index],
            no_wrap=not column.whole,
            overflow="fold" if column.whole else "ellipsis",
        )
    for row in rows:
        table.add_row(*(row[index] for index in shown))
    return table
