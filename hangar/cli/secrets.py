"""``hangar secrets``: an app's secrets, set from the command line, listed by name and digest
(values are never shown), unset."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from hangar.cli.client import HangarClient
from hangar.cli.output import call, console, fail

secrets_app = typer.Typer(
    help="App secrets: environment for its machines, sealed at rest.", no_args_is_help=True
)
DEFAULT_APP = "default"
AppOption = Annotated[str, typer.Option("--app", "-a")]


@secrets_app.command("list")
def secrets_list(app_name: AppOption = DEFAULT_APP) -> None:
    table = Table("NAME", "DIGEST", "UPDATED")
    for secret in call(HangarClient().list_secrets, app_name)["secrets"]:
        table.add_row(secret["name"], secret["digest"], secret["updated_at"])
    console.print(table)


@secrets_app.command("set")
def secrets_set(
    pairs: Annotated[list[str], typer.Argument(help="NAME=VALUE (NAME=- reads it from stdin)")],
    app_name: AppOption = DEFAULT_APP,
) -> None:
    """Set secrets; machines get them as environment at their next start."""
    values: dict[str, str | None] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            fail(f"expected NAME=VALUE, got {name!r}", 2)
        values[name] = sys.stdin.read() if value == "-" else value
    updated = call(HangarClient().update_secrets, app_name, values)
    console.print(f"set {', '.join(values)} (secrets version {updated['version']})")


@secrets_app.command("unset")
def secrets_unset(
    names: Annotated[list[str], typer.Argument(help="NAME...")],
    app_name: AppOption = DEFAULT_APP,
) -> None:
    removed: dict[str, str | None] = dict.fromkeys(names)
    updated = call(HangarClient().update_secrets, app_name, removed)
    console.print(f"unset {', '.join(names)} (secrets version {updated['version']})")
