"""``hangar volumes create|list|show|extend|destroy|snapshots``, and how ``hangar machine run
-v NAME:/path`` finds the volume it names."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from hangar.cli.client import HangarClient
from hangar.cli.output import AppOption, call, console, fail

DEFAULT_APP = "default"
VOLUME_ID_PREFIX = "vol_"

volumes_app = typer.Typer(help="Volumes: disks that outlive machines.", no_args_is_help=True)
snapshots_app = typer.Typer(help="A volume's snapshots.", no_args_is_help=True)
volumes_app.add_typer(snapshots_app, name="snapshots")


def _row(table: Table, volume: dict[str, Any]) -> None:
    table.add_row(
        volume["id"],
        volume["name"],
        volume["state"],
        f"{volume['size_gb']}GB",
        volume["region"],
        "yes" if volume["encrypted"] else "no",
        volume.get("attached_machine_id") or "",
        volume["created_at"],
    )


def _table() -> Table:
    return Table("ID", "NAME", "STATE", "SIZE", "REGION", "ENCRYPTED", "ATTACHED VM", "CREATED")


@volumes_app.command("create")
def volumes_create(
    name: str,
    app_name: AppOption = DEFAULT_APP,
    size: Annotated[int | None, typer.Option("--size", "-s", help="GB (default 1).")] = None,
    region: Annotated[str | None, typer.Option("--region", "-r")] = None,
    no_encryption: Annotated[
        bool, typer.Option("--no-encryption", help="Store the data unencrypted.")
    ] = False,
    retention: Annotated[
        int | None, typer.Option("--snapshot-retention", help="Days snapshots are kept.")
    ] = None,
    snapshot: Annotated[
        str | None, typer.Option("--snapshot-id", help="Restore from this snapshot.")
    ] = None,
    source: Annotated[
        str | None, typer.Option("--source-volume-id", help="Fork this volume as it is now.")
    ] = None,
) -> None:
    """Create a volume (blank, restored from a snapshot, or forked from a volume)."""
    body: dict[str, Any] = {"name": name, "encrypted": not no_encryption}
    for key, value in (
        ("size_gb", size),
        ("region", region),
        ("snapshot_retention", retention),
        ("snapshot_id", snapshot),
        ("source_volume_id", source),
    ):
        if value is not None:
            body[key] = value
    volume = call(HangarClient().create_volume, app_name, body)
    table = _table()
    _row(table, volume)
    console.print(table)


@volumes_app.command("list")
def volumes_list(
    app_name: AppOption = DEFAULT_APP,
    all_volumes: Annotated[bool, typer.Option("--all", help="Include destroyed.")] = False,
) -> None:
    table = _table()
    for volume in call(HangarClient().list_volumes, app_name, all_volumes):
        _row(table, volume)
    console.print(table)


@volumes_app.command("show")
def volumes_show(volume_id: str, app_name: AppOption = DEFAULT_APP) -> None:
    console.print_json(data=call(HangarClient().get_volume, app_name, volume_id))


@volumes_app.command("extend")
def volumes_extend(
    volume_id: str,
    size: Annotated[int, typer.Option("--size", "-s", help="The new size, GB.")],
    app_name: AppOption = DEFAULT_APP,
) -> None:
    """Grow a volume; a running machine sees the new size at once."""
    body = call(HangarClient().extend_volume, app_name, volume_id, size)
    console.print(f"volume {volume_id} is now {body['volume']['size_gb']}GB")


@volumes_app.command("destroy")
def volumes_destroy(volume_id: str, app_name: AppOption = DEFAULT_APP) -> None:
    """Destroy a volume (its key first: the data cannot be read again)."""
    volume = call(HangarClient().delete_volume, app_name, volume_id)
    console.print(f"volume {volume_id} {volume['state']}")


@snapshots_app.command("list")
def snapshots_list(volume_id: str, app_name: AppOption = DEFAULT_APP) -> None:
    table = Table("ID", "CREATED", "SIZE", "KIND", "RETENTION")
    for snapshot in call(HangarClient().list_snapshots, app_name, volume_id):
        table.add_row(
            snapshot["id"],
            snapshot["created_at"],
            str(snapshot["size"]),
            "daily" if snapshot["scheduled"] else "on request",
            f"{snapshot['retention_days']}d",
        )
    console.print(table)


@snapshots_app.command("create")
def snapshots_create(volume_id: str, app_name: AppOption = DEFAULT_APP) -> None:
    snapshot = call(HangarClient().create_snapshot, app_name, volume_id)
    console.print(snapshot["id"])


def parse_volume_flag(flag: str) -> tuple[str, str]:
    """``NAME:/path`` or ``vol_ID:/path`` -> (name or id, path)."""
    volume, sep, path = flag.partition(":")
    if not sep or not volume or not path.startswith("/"):
        fail(f"--volume takes NAME:/path (or vol_ID:/path), got {flag!r}", 2)
    return volume, path


def resolve_mounts(api: HangarClient, app_name: str, flags: list[str]) -> list[dict[str, str]]:
    """``config.mounts`` for ``-v`` flags: a volume id as given, a name as the app's first
    created volume of that name that no machine has attached."""
    mounts = []
    volumes: list[dict[str, Any]] | None = None
    taken: set[str] = set()
    for flag in flags:
        volume, path = parse_volume_flag(flag)
        if volume.startswith(VOLUME_ID_PREFIX):
            mounts.append({"volume": volume, "path": path})
            continue
        if volumes is None:
            volumes = list(api.list_volumes(app_name))
        free = [
            v
            for v in volumes
            if v["name"] == volume
            and v["state"] == "created"
            and not v.get("attached_machine_id")
            and v["id"] not in taken
        ]
        if not free:
            fail(
                f"app {app_name} has no unattached volume named {volume}; create one with "
                f"`hangar volumes create {volume} --app {app_name}`"
            )
        taken.add(free[0]["id"])
        mounts.append({"volume": free[0]["id"], "path": path, "name": volume})
    return mounts
