"""``hangar orgs|tokens|audit|admin``: orgs and their quotas, API tokens, the audit log.

All of them talk HTTP, except ``hangar admin token``: run on the server's host, it mints an
operator token straight into the database, which is how an operator gets in without one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hangar.cli.client import HangarClient
from hangar.cli.output import JsonFlag, call, console, errors, fail, print_json
from hangar.cli.tables import Col, fit_table

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
    slug: str,
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    as_json: JsonFlag = False,
) -> None:
    created = call(HangarClient().create_org, slug, name)
    if as_json:
        print_json(created)
        return
    console.print(f"created org [bold]{slug}[/bold]")


@orgs_app.command("list")
def orgs_list(as_json: JsonFlag = False) -> None:
    body = call(HangarClient().list_orgs)
    if as_json:
        print_json(body)
        return
    rows = []
    for org in body["orgs"]:
        usage, quotas = org["usage"], org["quotas"]
        gpus = ", ".join(f"{kind}={count}" for kind, count in usage["gpus"].items())
        limits = ", ".join(
            f"{name}={value}" for name, value in quotas.items() if value not in (None, {})
        )
        rows.append(
            [
                org["slug"],
                org["name"],
                str(usage["machines"]),
                str(usage["memory_mb"]),
                gpus,
                limits or "none",
            ]
        )
    columns = [
        Col("SLUG", whole=True),
        Col("NAME", drop=1),
        Col("MACHINES"),
        Col("MEMORY MB", drop=0),
        Col("GPUS"),
        Col("QUOTAS", shrink=True),
    ]
    console.print(fit_table(columns, rows, console))


@orgs_app.command("quota")
def orgs_quota(
    slug: str,
    machines: Annotated[str, typer.Option(help="Most machines; 'none' for no limit.")] = "none",
    memory_mb: Annotated[str, typer.Option(help="Most memory (MB); 'none' for no limit.")] = "none",
    gpu: Annotated[
        list[str] | None, typer.Option("--gpu", help="KIND=COUNT, e.g. l40s=4 (repeatable).")
    ] = None,
    as_json: JsonFlag = False,
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
    if as_json:
        print_json(org)
        return
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
    as_json: JsonFlag = False,
) -> None:
    """Create a token; its secret is printed once, on stdout (all of it with --json)."""
    body = {
        "org_slug": org,
        "app_name": app_name,
        "read_only": read_only,
        "expires_in": expires,
        "description": description,
    }
    created = call(HangarClient().create_token, body)
    if as_json:
        print_json(created)
        return
    scope = f"app {app_name}" if app_name else f"org {org}"
    mode = "read-only" if read_only else "read-write"
    errors.print(f"token {created['id']} ({mode}, {scope}); shown once:", style="dim")
    typer.echo(created["token"])


@tokens_app.command("list")
def tokens_list(
    org: Annotated[str | None, typer.Option("--org")] = None, as_json: JsonFlag = False
) -> None:
    body = call(HangarClient().list_tokens, org)
    if as_json:
        print_json(body)
        return
    rows = [
        [
            token["id"],
            token["kind"],
            token["org_slug"] or "",
            token["app_name"] or "",
            "read-only" if token["read_only"] else "read-write",
            token["status"],
            token["expires_at"] or "never",
            token["description"],
        ]
        for token in body["tokens"]
    ]
    columns = [
        Col("ID", whole=True),
        Col("KIND", drop=2),
        Col("ORG", whole=True),
        Col("APP", whole=True),
        Col("ACCESS"),
        Col("STATUS"),
        Col("EXPIRES", drop=1),
        Col("DESCRIPTION", shrink=True, drop=0),
    ]
    console.print(fit_table(columns, rows, console))


@tokens_app.command("revoke")
def tokens_revoke(token_id: str, as_json: JsonFlag = False) -> None:
    answer = call(HangarClient().revoke_token, token_id)
    if as_json:
        print_json(answer)
        return
    console.print(f"revoked {token_id}")


@audit_app.callback(invoke_without_command=True)
def audit(
    org: Annotated[str | None, typer.Option("--org")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """The latest audit records, newest first."""
    body = call(HangarClient().audit, org, limit)
    if as_json:
        print_json(body)
        return
    rows = [
        [
            str(record["seq"]),
            record["time"],
            record["token_id"],
            record["org_slug"],
            record["action"],
            record["target"],
            record["outcome"],
            str(record["status"]),
        ]
        for record in body["records"]
    ]
    columns = [
        Col("SEQ", drop=1),
        Col("TIME", drop=0),
        Col("TOKEN", whole=True),
        Col("ORG", whole=True, drop=2),
        Col("ACTION"),
        Col("TARGET", shrink=True),
        Col("OUTCOME"),
        Col("STATUS"),
    ]
    console.print(fit_table(columns, rows, console))


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
