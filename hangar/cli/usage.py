"""``hangar usage``: an org's metered seconds and cost over a window, by app, machine or
GPU kind (``GET /v1/orgs/{org}/usage``)."""

from __future__ import annotations

from typing import Annotated

import typer

from hangar.cli.client import HangarClient
from hangar.cli.output import JsonFlag, call, console, print_json
from hangar.cli.tables import Col, fit_table


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.3f}"


def usage(
    org: Annotated[str, typer.Option("--org", help="The org (an org token's own).")] = "personal",
    start: Annotated[
        str | None,
        typer.Option("--from", help="Start: RFC 3339 time or unix seconds (default: 30 days ago)."),
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="End: RFC 3339 time or unix seconds (default: now).")
    ] = None,
    group_by: Annotated[
        str, typer.Option("--by", help="Group by app, machine or gpu_kind.")
    ] = "app",
    as_json: JsonFlag = False,
) -> None:
    """Seconds each group ran, the resources it held and what that cost."""
    body = call(HangarClient().usage, org, start, end, group_by)
    if as_json:
        print_json(body)
        return
    currency = body["currency"]
    rows = [
        [
            group["key"],
            f"{group['seconds']:.0f}",
            _hours(group["cpu_seconds"]),
            _hours(group["memory_gb_seconds"]),
            _hours(group["gpu_seconds"]),
            f"{group['cost']:.4f}",
        ]
        for group in [*body["groups"], {"key": "total", **body["total"]}]
    ]
    columns = [
        Col(group_by.upper(), whole=True),
        Col("SECONDS"),
        Col("CPU-H", drop=1),
        Col("GB-H", drop=0),
        Col("GPU-H"),
        Col(currency),
    ]
    console.print(f"usage of {body['org']} from {body['from']} to {body['to']}")
    console.print(fit_table(columns, rows, console))
    if body["unpriced"]:
        console.print(f"[yellow]no price set for: {', '.join(body['unpriced'])}[/yellow]")
