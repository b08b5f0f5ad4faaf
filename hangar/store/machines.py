"""The embedded MachineStore: apps, machines, config versions, events and leases in SQLite.

An app is an instance with an id: its machines carry that id, so a name deleted and taken
again (by another org, once its hold has passed) never shows the previous owner's records,
and deleting an app deletes every record under it. A machine keeps its newest config
versions only (``keep_versions``).

Each org's usage counters (``org_usage``: what its machines that are not destroyed add up
to, ``hangar.model.footprint``) change in the same transaction as every machine write that
moves them, so they survive a crash exactly as the machines do. A database from before the
counters is counted once, when it is opened (``org_usage_counted`` marks it done)."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from hangar.errors import Conflict, NameTaken, NotFound
from hangar.model.config import MachineConfig, with_metadata_edits
from hangar.model.footprint import Footprint, footprint_change
from hangar.model.machine import ImageRef, Lease, Machine, MachineEvent, MachineState
from hangar.model.services import CheckStatus
from hangar.store.protocol import App
from hangar.store.sqlite_db import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    org_slug TEXT NOT NULL,
    created_at REAL NOT NULL,
    network TEXT NOT NULL DEFAULT 'default',
    numeric_id INTEGER
);
CREATE TABLE IF NOT EXISTS app_name_holds (
    name TEXT PRIMARY KEY,
    org_slug TEXT NOT NULL,
    deleted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS machines (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    region TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    config TEXT NOT NULL,
    image_ref TEXT NOT NULL,
    private_ip TEXT NOT NULL,
    host_id TEXT NOT NULL,
    failure_reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    cordoned INTEGER NOT NULL DEFAULT 0,
    checks TEXT NOT NULL DEFAULT '[]',
    skip_secrets INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS machines_live_name
    ON machines(app, name) WHERE state != 'destroyed';
CREATE INDEX IF NOT EXISTS machines_app ON machines(app, created_at);
CREATE INDEX IF NOT EXISTS machines_app_page ON machines(app, created_at, id);
CREATE TABLE IF NOT EXISTS org_usage (
    org_slug TEXT NOT NULL,
    counter TEXT NOT NULL,
    amount INTEGER NOT NULL,
    PRIMARY KEY (org_slug, counter)
);
CREATE TABLE IF NOT EXISTS org_usage_counted (
    id INTEGER PRIMARY KEY CHECK (id = 1)
);
CREATE TABLE IF NOT EXISTS machine_versions (
    machine_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    replaced_at REAL,
    PRIMARY KEY (machine_id, version)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    machine_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_machine ON events(machine_id, seq);
CREATE TABLE IF NOT EXISTS leases (
    machine_id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""


DEFAULT_KEEP_VERSIONS = 10
APP_COLUMNS = ("name", "org_slug", "created_at", "network", "numeric_id", "id")
APP_SELECT = ", ".join(APP_COLUMNS)
MACHINE_COLUMNS = (
    "id",
    "app",
    "name",
    "state",
    "region",
    "instance_id",
    "version",
    "config",
    "image_ref",
    "private_ip",
    "host_id",
    "failure_reason",
    "created_at",
    "updated_at",
    "cordoned",
    "checks",
    "skip_secrets",
    "app_id",
)
MACHINE_SELECT = ", ".join(MACHINE_COLUMNS)
_CHECKS = TypeAdapter(list[CheckStatus])


# The machines of ``app`` (a name) that belong to the app of that name now.
_OF_CURRENT_APP = "app = ? AND app_id = IFNULL((SELECT id FROM apps WHERE name = ?), app_id)"


def new_app_id() -> str:
    return "app_" + secrets.token_hex(8)


class SqliteMachineStore(SqliteDatabase):
    def __init__(self, path: Path, keep_versions: int = DEFAULT_KEEP_VERSIONS) -> None:
        super().__init__(path, SCHEMA)
        self.keep_versions = max(1, keep_versions)
        self.ensure_columns(
            "apps",
            {
                "id": "TEXT NOT NULL DEFAULT ''",
                "network": "TEXT NOT NULL DEFAULT 'default'",
                "numeric_id": "INTEGER",
            },
        )
        self.ensure_columns(
            "machines",
            {
                "cordoned": "INTEGER NOT NULL DEFAULT 0",
                "checks": "TEXT NOT NULL DEFAULT '[]'",
                "skip_secrets": "INTEGER NOT NULL DEFAULT 0",
                "app_id": "TEXT NOT NULL DEFAULT ''",
            },
        )
        with self.transaction() as db:
            for row in db.execute("SELECT name FROM apps WHERE id = ''").fetchall():
                db.execute("UPDATE apps SET id = ? WHERE name = ?", (new_app_id(), row["name"]))
            db.execute(
                "UPDATE machines SET app_id = IFNULL((SELECT id FROM apps"
                " WHERE apps.name = machines.app), '') WHERE app_id = ''"
            )
            # Apps made before numeric ids existed get theirs once, in creation order.
            db.execute("UPDATE apps SET numeric_id = rowid WHERE numeric_id IS NULL")
        self._count_once()

    # usage counters
    def _count_once(self) -> None:
        """Count every org's usage from its machines, if this database never has."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM org_usage_counted").fetchone() is not None:
                return
            totals: dict[str, Footprint] = {}
            for row in db.execute(
                "SELECT apps.org_slug, machines.config FROM machines JOIN apps"
                " ON apps.name = machines.app AND machines.app_id IN ('', apps.id)"
                " WHERE machines.state != 'destroyed'"
            ):
                config = MachineConfig.model_validate_json(row["config"])
                totals.setdefault(row["org_slug"], Footprint()).add(config)
            db.execute("DELETE FROM org_usage")
            for org_slug, footprint in totals.items():
                self._add_counters(db, org_slug, footprint.counters())
            db.execute("INSERT INTO org_usage_counted VALUES (1)")

    @staticmethod
    def _add_counters(db: sqlite3.Connection, org_slug: str, change: dict[str, int]) -> None:
        db.executemany(
            "INSERT INTO org_usage VALUES (?, ?, ?) ON CONFLICT (org_slug, counter)"
            " DO UPDATE SET amount = amount + excluded.amount",
            [(org_slug, counter, amount) for counter, amount in change.items()],
        )

    def _count(
        self,
        db: sqlite3.Connection,
        app: tuple[str, str],
        before: MachineConfig | None,
        after: MachineConfig | None,
    ) -> None:
        """Inside a machine write's transaction: the machine of ``app`` (its name and id)
        counted with ``before`` now counts with ``after`` (None: not counted). A machine
        whose app is gone (or is an earlier app of the name) counts for no org."""
        change = footprint_change(before, after)
        if not change:
            return
        row = db.execute(
            "SELECT org_slug FROM apps WHERE name = ? AND ? IN ('', id)", app
        ).fetchone()
        if row is not None:
            self._add_counters(db, row["org_slug"], change)

    @staticmethod
    def _counted_as(
        db: sqlite3.Connection, machine_id: str
    ) -> tuple[tuple[str, str], MachineConfig | None]:
        """The stored machine's app (name and id) and the config it counts with (None:
        destroyed)."""
        row = db.execute(
            "SELECT app, app_id, state, config FROM machines WHERE id = ?", (machine_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"machine {machine_id} not found", machine_id=machine_id)
        app = (row["app"], row["app_id"])
        if row["state"] == str(MachineState.DESTROYED):
            return app, None
        return app, MachineConfig.model_validate_json(row["config"])

    def machine_usage(self, org_slug: str) -> Footprint:
        rows = self._query("SELECT counter, amount FROM org_usage WHERE org_slug = ?", (org_slug,))
        return Footprint.from_counters({row["counter"]: row["amount"] for row in rows})

    # apps
    def create_app(
        self,
        name: str,
        org_slug: str,
        now: float,
        network: str = "default",
        name_hold_s: float = 0.0,
    ) -> App:
        """A new app instance; a name deleted less than ``name_hold_s`` ago stays its
        previous org's (another org gets the same 409 as for a name in use)."""
        try:
            with self.transaction() as db:
                held = db.execute(
                    "SELECT org_slug, deleted_at FROM app_name_holds WHERE name = ?", (name,)
                ).fetchone()
                if (
                    held is not None
                    and held["org_slug"] != org_slug
                    and held["deleted_at"] + name_hold_s > now
                ):
                    raise sqlite3.IntegrityError("name held")
                db.execute(
                    f"INSERT INTO apps ({APP_SELECT}) VALUES (?, ?, ?, ?,"
                    " (SELECT COALESCE(MAX(numeric_id), 0) + 1 FROM apps), ?)",
                    (name, org_slug, now, network, new_app_id()),
                )
                db.execute("DELETE FROM app_name_holds WHERE name = ?", (name,))
        except sqlite3.IntegrityError:
            raise NameTaken(f"app {name} already exists", app=name) from None
        app = self.get_app(name)
        assert app is not None
        return app

    @staticmethod
    def _app_from(row: sqlite3.Row) -> App:
        return App(**{column: row[column] for column in APP_COLUMNS})

    def get_app(self, name: str) -> App | None:
        rows = self._query(f"SELECT {APP_SELECT} FROM apps WHERE name = ?", (name,))
        return self._app_from(rows[0]) if rows else None

    def list_apps(self, org_slug: str | None) -> list[App]:
        if org_slug is None:
            rows = self._query(f"SELECT {APP_SELECT} FROM apps ORDER BY name")
        else:
            rows = self._query(
                f"SELECT {APP_SELECT} FROM apps WHERE org_slug = ? ORDER BY name", (org_slug,)
            )
        return [self._app_from(row) for row in rows]

    def delete_app(self, name: str, now: float = 0.0) -> list[str]:
        """Delete the app and every record of its machines (configs and their versions,
        events, leases), in one transaction; the name is held for its org from ``now``.
        Returns the ids of the machines whose records were deleted."""
        with self.transaction() as db:
            app = db.execute("SELECT org_slug, id FROM apps WHERE name = ?", (name,)).fetchone()
            if app is None:
                return []
            rows = db.execute(
                "SELECT id, app, app_id, state, config FROM machines WHERE app = ? OR app_id = ?",
                (name, app["id"]),
            ).fetchall()
            ids = [row["id"] for row in rows]
            for row in rows:
                if row["state"] != str(MachineState.DESTROYED):
                    config = MachineConfig.model_validate_json(row["config"])
                    self._count(db, (row["app"], row["app_id"]), config, None)
            for machine_id in ids:
                for table in ("machine_versions", "events", "leases"):
                    db.execute(f"DELETE FROM {table} WHERE machine_id = ?", (machine_id,))
                db.execute("DELETE FROM machines WHERE id = ?", (machine_id,))
            db.execute("DELETE FROM apps WHERE name = ?", (name,))
            db.execute(
                "INSERT OR REPLACE INTO app_name_holds VALUES (?, ?, ?)",
                (name, app["org_slug"], now),
            )
        self.truncate_wal()
        return ids

    # machines
    @staticmethod
    def _machine_row(machine: Machine) -> tuple[Any, ...]:
        return (
            machine.id,
            machine.app,
            machine.name,
            str(machine.state),
            machine.region,
            machine.instance_id,
            machine.version,
            machine.config.model_dump_json(),
            machine.image_ref.model_dump_json(),
            machine.private_ip,
            machine.host_id,
            machine.failure_reason,
            machine.created_at,
            machine.updated_at,
            int(machine.cordoned),
            _CHECKS.dump_json(machine.checks).decode(),
            int(machine.skip_secrets),
            machine.app_id,
        )

    @staticmethod
    def _machine_from(row: sqlite3.Row) -> Machine:
        values = {name: row[name] for name in MACHINE_COLUMNS}
        values["config"] = MachineConfig.model_validate_json(values["config"])
        values["image_ref"] = ImageRef.model_validate_json(values["image_ref"])
        values["state"] = MachineState(values["state"])
        values["cordoned"] = bool(values["cordoned"])
        values["skip_secrets"] = bool(values["skip_secrets"])
        values["checks"] = _CHECKS.validate_json(values["checks"])
        return Machine(**values)

    def insert_machine(self, machine: Machine) -> None:
        try:
            with self.transaction() as db:
                row = self._machine_row(machine)
                db.execute(
                    f"INSERT INTO machines ({MACHINE_SELECT}) VALUES"
                    f" ({', '.join('?' for _ in MACHINE_COLUMNS[:-1])},"
                    " IFNULL(NULLIF(?, ''), IFNULL((SELECT id FROM apps WHERE name = ?), '')))",
                    (*row, machine.app),
                )
                stored = db.execute(
                    "SELECT app_id FROM machines WHERE id = ?", (machine.id,)
                ).fetchone()
                self._count(db, (machine.app, stored["app_id"]), None, _counted(machine))
                db.execute(
                    "INSERT INTO machine_versions VALUES (?, ?, ?, ?, NULL)",
                    (
                        machine.id,
                        machine.version,
                        machine.config.model_dump_json(),
                        machine.created_at,
                    ),
                )
        except sqlite3.IntegrityError:
            raise Conflict(
                f"a machine named {machine.name} already exists in app {machine.app}",
                field="name",
            ) from None

    def get_machine(self, machine_id: str) -> Machine | None:
        rows = self._query(f"SELECT {MACHINE_SELECT} FROM machines WHERE id = ?", (machine_id,))
        return self._machine_from(rows[0]) if rows else None

    def list_machines(
        self,
        app: str | None,
        include_destroyed: bool = False,
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Machine]:
        sql = f"SELECT {MACHINE_SELECT} FROM machines WHERE 1=1"
        params: list[Any] = []
        if app is not None:
            sql += f" AND {_OF_CURRENT_APP}"
            params += [app, app]
        if not include_destroyed:
            sql += " AND state != 'destroyed'"
        if after is not None:
            sql += " AND (created_at, id) > (SELECT created_at, id FROM machines WHERE id = ?)"
            params.append(after)
        sql += " ORDER BY created_at, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = self._query(sql, tuple(params))
        return [self._machine_from(row) for row in rows]

    def save_machine(self, machine: Machine) -> None:
        row = self._machine_row(machine)
        # app_id is the machine's for good: never rewritten.
        assignments = ", ".join(f"{name} = ?" for name in MACHINE_COLUMNS[1:-1])
        with self.transaction() as db:
            app, before = self._counted_as(db, machine.id)
            db.execute(f"UPDATE machines SET {assignments} WHERE id = ?", (*row[1:-1], row[0]))
            if app[0] == machine.app:
                self._count(db, app, before, _counted(machine))
            else:
                self._count(db, app, before, None)
                self._count(db, (machine.app, app[1]), None, _counted(machine))

    def set_image_ref(self, machine_id: str, image_ref: ImageRef, now: float) -> None:
        """Only the image reference: a concurrent metadata or config write is not lost."""
        self._execute(
            "UPDATE machines SET image_ref = ?, updated_at = ? WHERE id = ?",
            (image_ref.model_dump_json(), now, machine_id),
        )

    def set_cordoned(self, machine_id: str, cordoned: bool, now: float) -> None:
        changed = self._execute(
            "UPDATE machines SET cordoned = ?, updated_at = ? WHERE id = ?",
            (int(cordoned), now, machine_id),
        )
        if not changed:
            raise NotFound(f"machine {machine_id} not found", machine_id=machine_id)

    def set_skip_secrets(self, machine_id: str, skip_secrets: bool, now: float) -> None:
        changed = self._execute(
            "UPDATE machines SET skip_secrets = ?, updated_at = ? WHERE id = ?",
            (int(skip_secrets), now, machine_id),
        )
        if not changed:
            raise NotFound(f"machine {machine_id} not found", machine_id=machine_id)

    def update_metadata(
        self, machine_id: str, changes: dict[str, str | None], now: float
    ) -> dict[str, str]:
        with self.transaction() as db:
            row = db.execute("SELECT config FROM machines WHERE id = ?", (machine_id,)).fetchone()
            if row is None:
                raise NotFound(f"machine {machine_id} not found", machine_id=machine_id)
            config = MachineConfig.model_validate_json(row["config"])
            for key, value in changes.items():
                if value is None:
                    config.metadata.pop(key, None)
                else:
                    config.metadata[key] = value
            db.execute(
                "UPDATE machines SET config = ?, updated_at = ? WHERE id = ?",
                (config.model_dump_json(), now, machine_id),
            )
        return dict(config.metadata)

    def set_checks(self, machine_id: str, checks: list[CheckStatus]) -> None:
        """Only the checks: a concurrent config or state write is not lost."""
        self._execute(
            "UPDATE machines SET checks = ? WHERE id = ?",
            (_CHECKS.dump_json(checks).decode(), machine_id),
        )

    def set_state(
        self, machine_id: str, state: MachineState, now: float, reason: str = ""
    ) -> Machine:
        destroyed = str(MachineState.DESTROYED)
        with self.transaction() as db:
            row = db.execute(
                "SELECT app, app_id, state, config FROM machines WHERE id = ?", (machine_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"machine {machine_id} not found", machine_id=machine_id)
            db.execute(
                "UPDATE machines SET state = ?, updated_at = ?, failure_reason = ? WHERE id = ?",
                (str(state), now, reason, machine_id),
            )
            if (row["state"] == destroyed) != (state is MachineState.DESTROYED):
                config = MachineConfig.model_validate_json(row["config"])
                app = (row["app"], row["app_id"])
                if state is MachineState.DESTROYED:
                    self._count(db, app, config, None)
                else:
                    self._count(db, app, None, config)
        machine = self.get_machine(machine_id)
        assert machine is not None
        return machine

    def apply_config_version(
        self,
        machine_id: str,
        config: MachineConfig,
        version: int,
        instance_id: str,
        now: float,
        metadata_before: dict[str, str] | None = None,
    ) -> None:
        with self.transaction() as db:
            app, before = self._counted_as(db, machine_id)
            body = config.model_dump_json()
            if metadata_before is not None:
                row = db.execute(
                    "SELECT config FROM machines WHERE id = ?", (machine_id,)
                ).fetchone()
                if row is not None:
                    current = MachineConfig.model_validate_json(row["config"]).metadata
                    body = with_metadata_edits(config, metadata_before, current).model_dump_json()
            db.execute(
                "UPDATE machine_versions SET replaced_at = ? WHERE machine_id = ?"
                " AND replaced_at IS NULL",
                (now, machine_id),
            )
            db.execute(
                "INSERT OR REPLACE INTO machine_versions VALUES (?, ?, ?, ?, NULL)",
                (machine_id, version, body, now),
            )
            changed = db.execute(
                "UPDATE machines SET version = ?, config = ?, instance_id = ?, updated_at = ?"
                " WHERE id = ?",
                (version, body, instance_id, now, machine_id),
            ).rowcount
            if not changed:
                raise NotFound(f"machine {machine_id} not found", machine_id=machine_id)
            self._count(db, app, before, None if before is None else config)
            db.execute(
                "DELETE FROM machine_versions WHERE machine_id = ? AND version NOT IN"
                " (SELECT version FROM machine_versions WHERE machine_id = ?"
                " ORDER BY version DESC LIMIT ?)",
                (machine_id, machine_id, self.keep_versions),
            )

    def list_config_versions(self, machine_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT version, config, created_at, replaced_at FROM machine_versions"
            " WHERE machine_id = ? ORDER BY version",
            (machine_id,),
        )
        return [
            {**dict(row), "config": MachineConfig.model_validate_json(row["config"])}
            for row in rows
        ]

    # events
    def add_event(self, machine_id: str, event: MachineEvent) -> None:
        self._execute(
            "INSERT INTO events (id, machine_id, body) VALUES (?, ?, ?)",
            (event.id, machine_id, event.model_dump_json()),
        )

    def list_events(self, machine_id: str, limit: int | None = None) -> list[MachineEvent]:
        sql = "SELECT body FROM events WHERE machine_id = ? ORDER BY seq DESC"
        params: tuple[Any, ...] = (machine_id,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (machine_id, limit)
        return [MachineEvent.model_validate_json(row["body"]) for row in self._query(sql, params)]

    # leases
    def get_lease(self, machine_id: str) -> Lease | None:
        rows = self._query("SELECT body FROM leases WHERE machine_id = ?", (machine_id,))
        return Lease.model_validate_json(rows[0]["body"]) if rows else None

    def put_lease(self, machine_id: str, lease: Lease) -> None:
        self._execute(
            "INSERT OR REPLACE INTO leases VALUES (?, ?)", (machine_id, lease.model_dump_json())
        )

    def delete_lease(self, machine_id: str) -> None:
        self._execute("DELETE FROM leases WHERE machine_id = ?", (machine_id,))


def _counted(machine: Machine) -> MachineConfig | None:
    """The config ``machine`` counts with against its org's quotas (None: destroyed)."""
    return None if machine.state is MachineState.DESTROYED else machine.config
