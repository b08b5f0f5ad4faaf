"""``hangar orgs|tokens|audit|admin``: orgs and their quotas, API tokens, the audit log.

All of them talk HTTP, except ``hangar admin token``: run on the server's host, it mints an
operator token straight into the database, which is how an operator gets in without one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hangar.cli.client import HangarClient
from hangar.cli.output import call, console, errors, fail

orgs_app = typer.Typer(help="Orgs own apps (operator).", no_args_is_help=True)
tokens_app = typer.Typer(
    help="API tokens: org, app and read-only (operator).", no_args_is_help=True
)
audit_app = typer.Typer(help="The audit log: every mutating call and operator action.")
admin_app = typer.Typer(help="Run on the server's host: bootstrap access.", no_args_is_help=True)


def _limit(value: str) -> int | None:
    return None if value in ("", "none", "unlimited") else int(value)


@orgs_app.command("create")
def orgs_create(
    slug: str, name: Annotated[str | None, typer.Option(help="Display name.")] = None
) -> None:
    call(HangarClient().create_org, slug, name)
    console.print(f"created org [bold]{slug}[/bold]")


@orgs_app.command("list")
def orgs_list() -> None:
    body = call(HangarClient().list_orgs)
    table = Table("SLUG", "NAME", "MACHINES", "MEMORY MB", "GPUS", "QUOTAS")
    for org in body["orgs"]:
        usage, quotas = org["usage"], org["quotas"]
        gpus = ", ".join(f"{kind}={count}" for kind, count in usage["gpus"].items())
        limits = ", ".join(
            f"{name}={value}" for name, value in quotas.items() if value not in (None, {})
        )
        table.add_row(
            org["slug"],
            org["name"],
            str(usage["machines"]),
            str(usage["memory_mb"]),
            gpus,
            limits or "none",
        )
    console.print(table)


@orgs_app.command("quota")
def orgs_quota(
    slug: str,
    machines: Annotated[str, typer.Option(help="Most machines; 'none' for no limit.")] = "none",
    memory_mb: Annotated[str, typer.Option(help="Most memory (MB); 'none' for no limit.")] = "none",
    gpu: Annotated[
        list[str] | None, typer.Option("--gpu", help="KIND=COUNT, e.g. l40s=4 (repeatable).")
    ] = None,
    volumes: Annotated[str, typer.Option(help="Most volumes; 'none' for no limit.")] = "none",
    volume_gb: Annotated[
        str, typer.Option(help="Most GB of volumes together; 'none' for no limit.")
    ] = "none",
) -> None:
    """Set an org's quotas (each one not given is lifted)."""
    gpus: dict[str, int] = {}
    for item in gpu or []:
        kind, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            fail(f"--gpu takes KIND=COUNT, got {item!r}", 2)
        gpus[kind] = int(count)
    try:
        quotas = {
            "machines": _limit(machines),
            "memory_mb": _limit(memory_mb),
            "gpus": gpus,
            "volumes": _limit(volumes),
            "volume_gb": _limit(volume_gb),
        }
    except ValueError:
        fail("--machines, --memory-mb, --volumes and --volume-gb take a number or 'none'", 2)
    org = call(HangarClient().set_quotas, slug, quotas)
    console.print_json(data=org["quotas"])


@tokens_app.command("create")
def tokens_create(
    org: Annotated[str, typer.Option("--org", help="The org the token acts for.")],
    app_name: Annotated[
        str | None, typer.Option("--app", help="Limit the token to this app.")
    ] = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Reads only.")] = False,
    expires: Annotated[
        str | None, typer.Option("--expires", help="Lifetime: 90s, 30m, 24h, 7d...")
    ] = None,
    description: Annotated[str, typer.Option(help="What the token is for.")] = "",
) -> None:
    """Create a token; its secret is printed once, on stdout."""
    body = {
        "org_slug": org,
        "app_name": app_name,
        "read_only": read_only,
        "expires_in": expires,
        "description": description,
    }
    created = call(HangarClient().create_token, body)
    scope = f"app {app_name}" if app_name else f"org {org}"
    mode = "read-only" if read_only else "read-write"
    errors.print(f"token {created['id']} ({mode}, {scope}); shown once:", style="dim")
    typer.echo(created["token"])


@tokens_app.command("list")
def tokens_list(org: Annotated[str | None, typer.Option("--org")] = None) -> None:
    body = call(HangarClient().list_tokens, org)
    table = Table("ID", "KIND", "ORG", "APP", "ACCESS", "STATUS", "EXPIRES", "DESCRIPTION")
    for token in body["tokens"]:
        table.add_row(
            token["id"],
            token["kind"],
            token["org_slug"] or "",
            token["app_name"] or "",
            "read-only" if token["read_only"] else "read-write",
            token["status"],
            token["expires_at"] or "never",
            token["description"],
        )
    console.print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: str) -> None:
    call(HangarClient().revoke_token, token_id)
    console.print(f"revoked {token_id}")


@audit_app.callback(invoke_without_command=True)
def audit(
    org: Annotated[str | None, typer.Option("--org")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
) -> None:
    """The latest audit records, newest first."""
    body = call(HangarClient().audit, org, limit)
    table = Table("SEQ", "TIME", "TOKEN", "ORG", "ACTION", "TARGET", "OUTCOME", "STATUS")
    for record in body["records"]:
        table.add_row(
            str(record["seq"]),
            record["time"],
            record["token_id"],
            record["org_slug"],
            record["action"],
            record["target"],
            record["outcome"],
            str(record["status"]),
        )
    console.print(table)


@admin_app.command("token")
def admin_token(
    home: Annotated[Path | None, typer.Option(help="The server's $HANGAR_HOME.")] = None,
    description: Annotated[str, typer.Option(help="What the token is for.")] = "hangar admin",
) -> None:
    """Mint an operator token in the server's database (no API call) and print it once.
    This is the server's own administration, run on its host, not an API client."""
    from hangar.server import mint_operator_token
    from hangar.settings import Settings

    settings = Settings() if home is None else Settings(home=home)
    try:
        token_id, secret = mint_operator_token(settings, description)
    except FileNotFoundError:
        fail(
            f"no hangar database at {settings.database}: start `hangar server` once, "
            "or pass --home",
            2,
        )
    errors.print(f"operator token {token_id}; shown once:", style="dim")
    typer.echo(secret)
