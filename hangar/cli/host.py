"""``hangar host ...``: this host's GPUs and their readiness; quarantine release."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from hangar.cli.client import ApiError, HangarClient
from hangar.cli.output import JsonFlag, call, console, print_json

host_app = typer.Typer(
    help="Hosts: this host's GPUs (inventory, readiness, quarantine); a fleet's cordon, "
    "uncordon and drain.",
    no_args_is_help=True,
)


def claims_table(gpus: list[dict[str, Any]]) -> Table:
    table = Table("BDF", "KIND", "STATE", "MACHINE", "REASON", title="GPU claims (from the API)")
    for gpu in gpus:
        style = {"quarantined": "red", "cleaning": "yellow", "claimed": "cyan"}.get(
            gpu["state"], ""
        )
        table.add_row(
            gpu["bdf"],
            gpu["kind"],
            f"[{style}]{gpu['state']}[/{style}]" if style else gpu["state"],
            gpu["machine_id"],
            gpu["quarantine_reason"] or gpu["reason"],
        )
    return table


@host_app.command("inspect")
def inspect(
    sysfs_root: Annotated[
        Path, typer.Option(help="sysfs to read (a fixture tree in tests).")
    ] = Path("/sys"),
    nvml: Annotated[bool, typer.Option(help="Read NVML (UUIDs, MIG) when present.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the inventory as JSON.")] = False,
    api: Annotated[
        bool, typer.Option(help="Also show claim and quarantine states from the API.")
    ] = True,
) -> None:
    """Inventory and readiness of this host's GPUs, read from sysfs (read-only) and NVML."""
    from hangar.devices import (
        NoNvml,
        PynvmlReader,
        SysfsRoot,
        read_inventory,
        render_inspect_report,
    )
    from hangar.devices.sysfs import ReadOnlyWriter

    reader = PynvmlReader() if nvml else NoNvml("disabled with --no-nvml")
    inventory = read_inventory(SysfsRoot(sysfs_root, writer=ReadOnlyWriter()), nvml=reader)
    if as_json:
        console.print_json(inventory.model_dump_json())
        return
    console.print(render_inspect_report(inventory))
    if not api:
        return
    client = HangarClient()
    try:
        for host in client.request("GET", "/v1/hosts"):
            body = client.request("GET", f"/v1/hosts/{host['id']}/gpus")
            if body["gpus"]:
                console.print(claims_table(body["gpus"]))
    except (ApiError, OSError, httpx.TransportError) as exc:
        console.print(f"[yellow]claim states not shown: the API did not answer ({exc})[/yellow]")


@host_app.command("release-gpu")
def release_gpu(
    host_id: str,
    bdf: str,
    reason: Annotated[str, typer.Option(help="Why the GPU is safe to hand out again.")],
    as_json: JsonFlag = False,
) -> None:
    """Release a quarantined GPU: it is reset and verified again, and free only if that works.
    The operator token that asked is recorded with the reason."""
    body = call(
        HangarClient().request,
        "POST",
        f"/v1/hosts/{host_id}/gpus/{bdf}/release",
        json={"reason": reason},
    )
    if as_json:
        print_json(body)
        return
    console.print(f"GPU {bdf} on {host_id} is {body['state']}")


@host_app.command("cordon")
def cordon(host_id: str, as_json: JsonFlag = False) -> None:
    """Place no new machine on HOST (a fleet's API replica; what runs there keeps running)."""
    body = call(HangarClient().request, "POST", f"/v1/hosts/{host_id}/cordon")
    if as_json:
        print_json(body)
        return
    console.print(f"host {host_id} cordoned by {body['by']}")


@host_app.command("uncordon")
def uncordon(host_id: str, as_json: JsonFlag = False) -> None:
    """Place machines on HOST again."""
    body = call(HangarClient().request, "POST", f"/v1/hosts/{host_id}/uncordon")
    if as_json:
        print_json(body)
        return
    console.print(
        f"host {host_id} uncordoned" if body["ok"] else f"host {host_id} was not cordoned"
    )


@host_app.command("drain")
def drain(host_id: str, as_json: JsonFlag = False) -> None:
    """Cordon HOST and recreate its stopped machines without volumes on other hosts (same
    config and name, new ids); running, leased and volume-bound machines stay."""
    body = call(HangarClient().request, "POST", f"/v1/hosts/{host_id}/drain")
    if as_json:
        print_json(body)
        return
    table = Table("MACHINE", "NEW MACHINE", "NEW HOST", title=f"drained from {host_id}")
    for moved in body["moved"]:
        table.add_row(moved["machine_id"], moved["new_machine_id"], moved["host_id"])
    console.print(table)
    for left in body["left"]:
        console.print(f"[yellow]{left['machine_id']} stays:[/yellow] {left['reason']}")
