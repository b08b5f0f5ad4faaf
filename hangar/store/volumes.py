"""The embedded VolumeStore: volume records in SQLite, written by compare-and-set on their
version (one ``UPDATE ... WHERE version = ?``, atomic under SQLite's write lock)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from hangar.errors import Conflict
from hangar.model.volume import Volume, VolumeState
from hangar.store.sqlite_db import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    host_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS volumes_app ON volumes(app, created_at);
CREATE INDEX IF NOT EXISTS volumes_host ON volumes(host_id, created_at);
"""


class SqliteVolumeStore(SqliteDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def insert_volume(self, volume: Volume) -> None:
        try:
            self._execute(
                "INSERT INTO volumes VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    volume.id,
                    volume.app,
                    volume.host_id,
                    str(volume.state),
                    volume.created_at,
                    volume.version,
                    volume.model_dump_json(),
                ),
            )
        except sqlite3.IntegrityError:
            raise Conflict(f"volume {volume.id} already exists", volume_id=volume.id) from None

    def get_volume(self, volume_id: str) -> Volume | None:
        rows = self._query("SELECT body FROM volumes WHERE id = ?", (volume_id,))
        return Volume.model_validate_json(rows[0]["body"]) if rows else None

    def list_volumes(
        self,
        app: str | None = None,
        *,
        host_id: str | None = None,
        include_destroyed: bool = False,
    ) -> list[Volume]:
        sql = "SELECT body FROM volumes WHERE 1=1"
        params: list[Any] = []
        if app is not None:
            sql += " AND app = ?"
            params.append(app)
        if host_id is not None:
            sql += " AND host_id = ?"
            params.append(host_id)
        if not include_destroyed:
            sql += " AND state != ?"
            params.append(str(VolumeState.DESTROYED))
        rows = self._query(sql + " ORDER BY created_at, rowid", tuple(params))
        return [Volume.model_validate_json(row["body"]) for row in rows]

    def forget_volumes(self, app: str) -> list[str]:
        with self.transaction() as db:
            ids = [
                row["id"]
                for row in db.execute(
                    "SELECT id FROM volumes WHERE app = ? AND state = ?",
                    (app, str(VolumeState.DESTROYED)),
                ).fetchall()
            ]
            db.execute(
                "DELETE FROM volumes WHERE app = ? AND state = ?", (app, str(VolumeState.DESTROYED))
            )
        self.truncate_wal()
        return ids

    def compare_and_set_volume(self, volume: Volume) -> bool:
        stored = volume.model_copy(update={"version": volume.version + 1})
        changed = self._execute(
            "UPDATE volumes SET state = ?, host_id = ?, version = ?, body = ?"
            " WHERE id = ? AND version = ?",
            (
                str(stored.state),
                stored.host_id,
                stored.version,
                stored.model_dump_json(),
                volume.id,
                volume.version,
            ),
        )
        return changed == 1
