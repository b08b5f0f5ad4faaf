"""The usage store: metered intervals, written by each host's agent and read by the API.

Every write is idempotent, so the agent may repeat any of them after a crash: opening an
interval that exists does nothing (ids are deterministic), a checkpoint only moves ``until``
forward, and closing a closed interval does nothing (it never extends one). The protocol is
kept free of SQLite idioms so a fleet backend (etcd) can implement it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from hangar.model.usage import UsageInterval, UsageSubject
from hangar.store.sqlite_db import SqliteDatabase


class UsageStore(Protocol):
    def open_interval(self, interval: UsageInterval) -> bool:
        """Insert ``interval`` unless one with its id exists (then False, nothing changes)."""
        ...

    def checkpoint(self, interval_ids: Sequence[str], until: float) -> None:
        """Move ``until`` of these open intervals forward to ``until`` (never back)."""
        ...

    def close_interval(self, interval_id: str, ended_at: float | None = None) -> bool:
        """Close an open interval at ``ended_at`` (never before its last checkpoint; None: at
        its last checkpoint). False if it was closed already or does not exist."""
        ...

    def get_interval(self, interval_id: str) -> UsageInterval | None: ...

    def open_intervals(self, host: str, machine_id: str | None = None) -> list[UsageInterval]:
        """The open intervals of ``host`` (of one machine there, if given)."""
        ...

    def intervals(self, org: str | None, start: float, end: float) -> list[UsageInterval]:
        """The intervals of ``org`` (every org when None) that overlap ``[start, end)``."""
        ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_intervals (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    org TEXT NOT NULL,
    app TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    volume_id TEXT NOT NULL,
    host TEXT NOT NULL,
    region TEXT NOT NULL,
    cpu_kind TEXT NOT NULL,
    cpus INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    gpu_kind TEXT NOT NULL,
    gpus REAL NOT NULL,
    volume_gb REAL NOT NULL,
    started_at REAL NOT NULL,
    until REAL NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS usage_org_start ON usage_intervals(org, started_at);
CREATE INDEX IF NOT EXISTS usage_open ON usage_intervals(host, closed);
"""

COLUMNS = (
    "id, subject, org, app, machine_id, volume_id, host, region, cpu_kind, cpus, memory_mb, "
    "gpu_kind, gpus, volume_gb, started_at, until, closed"
)


def _interval(row: sqlite3.Row) -> UsageInterval:
    values = dict(row)
    values["subject"] = UsageSubject(values["subject"])
    values["closed"] = bool(values["closed"])
    return UsageInterval.model_validate(values)


class SqliteUsageStore(SqliteDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def open_interval(self, interval: UsageInterval) -> bool:
        i = interval
        values: tuple[Any, ...] = (
            i.id, str(i.subject), i.org, i.app, i.machine_id, i.volume_id, i.host, i.region,
            i.cpu_kind, i.cpus, i.memory_mb, i.gpu_kind, i.gpus, i.volume_gb, i.started_at,
            max(i.until, i.started_at), int(i.closed),
        )  # fmt: skip
        placeholders = ", ".join("?" for _ in values)
        sql = f"INSERT OR IGNORE INTO usage_intervals ({COLUMNS}) VALUES ({placeholders})"
        return self._execute(sql, values) == 1

    def checkpoint(self, interval_ids: Sequence[str], until: float) -> None:
        if not interval_ids:
            return
        with self.transaction() as db:
            db.executemany(
                "UPDATE usage_intervals SET until = MAX(until, ?) WHERE id = ? AND closed = 0",
                [(until, interval_id) for interval_id in interval_ids],
            )

    def close_interval(self, interval_id: str, ended_at: float | None = None) -> bool:
        end = float("-inf") if ended_at is None else ended_at
        return (
            self._execute(
                "UPDATE usage_intervals SET until = MAX(until, ?), closed = 1 "
                "WHERE id = ? AND closed = 0",
                (end, interval_id),
            )
            == 1
        )

    def get_interval(self, interval_id: str) -> UsageInterval | None:
        rows = self._query(f"SELECT {COLUMNS} FROM usage_intervals WHERE id = ?", (interval_id,))
        return _interval(rows[0]) if rows else None

    def open_intervals(self, host: str, machine_id: str | None = None) -> list[UsageInterval]:
        sql = f"SELECT {COLUMNS} FROM usage_intervals WHERE host = ? AND closed = 0"
        params: tuple[Any, ...] = (host,)
        if machine_id is not None:
            sql += " AND machine_id = ?"
            params += (machine_id,)
        return [_interval(row) for row in self._query(sql + " ORDER BY started_at", params)]

    def intervals(self, org: str | None, start: float, end: float) -> list[UsageInterval]:
        sql = f"SELECT {COLUMNS} FROM usage_intervals WHERE started_at < ? AND until > ?"
        params: tuple[Any, ...] = (end, start)
        if org is not None:
            sql += " AND org = ?"
            params += (org,)
        return [_interval(row) for row in self._query(sql + " ORDER BY started_at, id", params)]
