"""``hangar secrets``: an app's secrets, set from the command line, listed by name and digest
(values are never shown), unset."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from hangar.cli.client import HangarClient
from hangar.cli.output import AppOption, JsonFlag, call, console, fail, print_json
from hangar.cli.tables import Col, fit_table

secrets_app = typer.Typer(
    help="App secrets: environment for its machines, sealed at rest.", no_args_is_help=True
)
DEFAULT_APP = "default"


@secrets_app.command("list")
def secrets_list(app_name: AppOption = DEFAULT_APP, as_json: JsonFlag = False) -> None:
    listed = call(HangarClient().list_secrets, app_name)
    if as_json:
        print_json(listed)
        return
    rows = [
        [secret["name"], secret["digest"], secret["updated_at"]] for secret in listed["secrets"]
    ]
    columns = [Col("NAME", whole=True), Col("DIGEST", shrink=True), Col("UPDATED", drop=0)]
    console.print(fit_table(columns, rows, console))


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
