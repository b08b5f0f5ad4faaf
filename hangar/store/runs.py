"""The embedded RunStore: a host agent's durable runs and the VMM handles it keeps.

A machine keeps its newest ``keep_finished`` finished runs (an update's run holds a whole
config): older ones are deleted as runs finish."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hangar.model.run import UNFINISHED, RunRecord, RunStatus
from hangar.store.sqlite_db import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_runs (
    id TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS agent_runs_machine ON agent_runs(machine_id, created_at);
CREATE INDEX IF NOT EXISTS agent_runs_status ON agent_runs(status);
CREATE TABLE IF NOT EXISTS vm_handles (
    machine_id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""


DEFAULT_KEEP_FINISHED = 10
_FINISHED = tuple(str(status) for status in RunStatus if not status.unfinished)


class SqliteRunStore(SqliteDatabase):
    def __init__(self, path: Path, keep_finished: int = DEFAULT_KEEP_FINISHED) -> None:
        super().__init__(path, SCHEMA)
        self.keep_finished = max(1, keep_finished)

    def insert_run(self, run: RunRecord) -> bool:
        return (
            self._execute(
                "INSERT OR IGNORE INTO agent_runs VALUES (?, ?, ?, ?, ?)",
                (run.id, run.machine_id, str(run.status), run.created_at, run.model_dump_json()),
            )
            == 1
        )

    def save_run(self, run: RunRecord) -> None:
        marks = ", ".join("?" for _ in _FINISHED)
        with self.transaction() as db:
            db.execute(
                "UPDATE agent_runs SET status = ?, body = ? WHERE id = ?",
                (str(run.status), run.model_dump_json(), run.id),
            )
            if not run.status.unfinished:
                db.execute(
                    f"DELETE FROM agent_runs WHERE machine_id = ? AND status IN ({marks})"
                    " AND id NOT IN (SELECT id FROM agent_runs WHERE machine_id = ?"
                    f" AND status IN ({marks}) ORDER BY created_at DESC, rowid DESC LIMIT ?)",
                    (run.machine_id, *_FINISHED, run.machine_id, *_FINISHED, self.keep_finished),
                )

    def list_runs(
        self, machine_id: str | None = None, unfinished_only: bool = False
    ) -> list[RunRecord]:
        sql = "SELECT body FROM agent_runs WHERE 1=1"
        params: list[Any] = []
        if machine_id is not None:
            sql += " AND machine_id = ?"
            params.append(machine_id)
        if unfinished_only:
            sql += f" AND status IN ({', '.join('?' for _ in UNFINISHED)})"
            params.extend(sorted(UNFINISHED))
        rows = self._query(sql + " ORDER BY created_at, rowid", tuple(params))
        return [RunRecord.model_validate_json(row["body"]) for row in rows]

    def forget_machines(self, machine_ids: list[str]) -> None:
        with self.transaction() as db:
            for machine_id in machine_ids:
                db.execute("DELETE FROM agent_runs WHERE machine_id = ?", (machine_id,))
                db.execute("DELETE FROM vm_handles WHERE machine_id = ?", (machine_id,))
        self.truncate_wal()

    # VMM handles
    def put_vm_handle(self, machine_id: str, handle: dict[str, Any]) -> None:
        self._execute(
            "INSERT OR REPLACE INTO vm_handles VALUES (?, ?)", (machine_id, json.dumps(handle))
        )

    def get_vm_handle(self, machine_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT body FROM vm_handles WHERE machine_id = ?", (machine_id,))
        return dict(json.loads(rows[0]["body"])) if rows else None

    def delete_vm_handle(self, machine_id: str) -> None:
        self._execute("DELETE FROM vm_handles WHERE machine_id = ?", (machine_id,))

    def list_vm_handles(self) -> dict[str, dict[str, Any]]:
        rows = self._query("SELECT machine_id, body FROM vm_handles")
        return {row["machine_id"]: dict(json.loads(row["body"])) for row in rows}
