"""The embedded GpuStore: a host's GPU inventory, VFIO bindings and GPU events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hangar.model.gpu import GpuEvent, GpuRecord
from hangar.store.sqlite_db import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS host_gpus (
    bdf TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    bdf TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS gpu_events_bdf ON gpu_events(bdf, seq);
"""


class SqliteGpuStore(SqliteDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def upsert_gpu_inventory(self, gpu: GpuRecord) -> GpuRecord:
        with self.transaction() as db:
            row = db.execute("SELECT body FROM host_gpus WHERE bdf = ?", (gpu.bdf,)).fetchone()
            if row is not None:
                current = GpuRecord.model_validate_json(row["body"])
                gpu = gpu.model_copy(
                    update={
                        "binding": current.binding,
                        "claim": current.claim,
                        "quarantine_reason": current.quarantine_reason,
                    }
                )
            db.execute(
                "INSERT OR REPLACE INTO host_gpus VALUES (?, ?, ?)",
                (gpu.bdf, gpu.host_id, gpu.model_dump_json()),
            )
        return gpu

    def list_gpus(self, host_id: str | None = None) -> list[GpuRecord]:
        sql = "SELECT body FROM host_gpus"
        params: tuple[Any, ...] = ()
        if host_id is not None:
            sql += " WHERE host_id = ?"
            params = (host_id,)
        rows = self._query(sql + " ORDER BY bdf", params)
        return [GpuRecord.model_validate_json(row["body"]) for row in rows]

    def get_gpu(self, bdf: str) -> GpuRecord | None:
        rows = self._query("SELECT body FROM host_gpus WHERE bdf = ?", (bdf,))
        return GpuRecord.model_validate_json(rows[0]["body"]) if rows else None

    def save_gpu(self, gpu: GpuRecord) -> None:
        self._execute(
            "INSERT OR REPLACE INTO host_gpus VALUES (?, ?, ?)",
            (gpu.bdf, gpu.host_id, gpu.model_dump_json()),
        )

    def add_gpu_event(self, event: GpuEvent) -> None:
        self._execute(
            "INSERT INTO gpu_events (bdf, body) VALUES (?, ?)", (event.bdf, event.model_dump_json())
        )

    def list_gpu_events(self, bdf: str | None = None) -> list[GpuEvent]:
        if bdf is None:
            rows = self._query("SELECT body FROM gpu_events ORDER BY seq DESC")
        else:
            rows = self._query(
                "SELECT body FROM gpu_events WHERE bdf = ? ORDER BY seq DESC", (bdf,)
            )
        return [GpuEvent.model_validate_json(row["body"]) for row in rows]
