"""``hangar machine status``: a machine as a person reads it (state, addresses, checks,
its latest events), ids whole."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table

from hangar.cli.tables import Col, fit_table


def _fields(machine: dict[str, Any]) -> Table:
    config = machine.get("config", {})
    guest = config.get("guest", {})
    services = config.get("services") or []
    ports = [
        f"{port.get('port', port.get('start_port'))}->{service.get('internal_port')}"
        f"/{service.get('protocol', 'tcp')}"
        for service in services
        for port in service.get("ports") or []
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in [
        ("ID", machine["id"]),
        ("Name", machine["name"]),
        ("State", machine["state"]),
        ("Region", machine.get("region", "")),
        ("Image", config.get("image", "")),
        (
            "Guest",
            f"{guest.get('cpus', 1)}x {guest.get('cpu_kind', 'shared')}, "
            f"{guest.get('memory_mb', 256)} MB"
            + (f", {guest['gpus']}x {guest.get('gpu_kind')}" if guest.get("gpus") else ""),
        ),
        ("Private IP", machine.get("private_ip") or "none"),
        ("Ports", ", ".join(ports) or "none"),
        ("Instance", machine.get("instance_id", "")),
        ("Updated", machine.get("updated_at", "")),
    ]:
        grid.add_row(label, str(value))
    if machine.get("failure_reason"):
        grid.add_row("Failure", f"[red]{machine['failure_reason']}[/red]")
    return grid


def _checks(machine: dict[str, Any], console: Console) -> RenderableType:
    checks = machine.get("checks") or []
    if not checks:
        return "[dim]Checks: none[/dim]"
    rows = [
        [str(c.get("name", "")), str(c.get("status", "")), str(c.get("output", ""))] for c in checks
    ]
    columns = [Col("CHECK", whole=True), Col("STATUS"), Col("OUTPUT", shrink=True)]
    return fit_table(columns, rows, console, title="Checks")


def _events(events: list[dict[str, Any]], console: Console) -> RenderableType:
    if not events:
        return "[dim]Events: none[/dim]"
    rows = []
    for event in events:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["timestamp"] / 1000))
        detail = {k: v for k, v in event.get("request", {}).items() if k != "run_id"}
        rows.append([stamp, event["type"], event["status"], event["source"], json.dumps(detail)])
    columns = [
        Col("TIME"),
        Col("TYPE"),
        Col("STATUS"),
        Col("SOURCE", drop=0),
        Col("DETAIL", shrink=True, min_width=10),
    ]
    return fit_table(columns, rows, console, title="Events")


def machine_status_view(
    machine: dict[str, Any], events: list[dict[str, Any]], console: Console
) -> RenderableType:
    return Group(_fields(machine), "", _checks(machine, console), "", _events(events, console))
