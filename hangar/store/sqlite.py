"""The embedded ClusterStore: one SQLite file in WAL mode, one connection guarded by a lock."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hangar.errors import Conflict, NotFound
from hangar.model.config import MachineConfig
from hangar.model.gpu import GpuEvent, GpuRecord, GpuState
from hangar.model.machine import ImageRef, Lease, Machine, MachineEvent, MachineState
from hangar.store.protocol import App, RunRecord, RunStatus
from hangar.store.sqlite_db import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    org_slug TEXT NOT NULL,
    created_at REAL NOT NULL
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
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS machines_live_name
    ON machines(app, name) WHERE state != 'destroyed';
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
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_machine ON runs(machine_id, created_at);
CREATE TABLE IF NOT EXISTS gpus (
    bdf TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS gpus_machine ON gpus(machine_id);
CREATE TABLE IF NOT EXISTS gpu_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    bdf TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vm_handles (
    machine_id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""


class SqliteStore(SqliteDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    # apps
    def create_app(self, name: str, org_slug: str, now: float) -> App:
        try:
            self._execute("INSERT INTO apps VALUES (?, ?, ?)", (name, org_slug, now))
        except sqlite3.IntegrityError:
            raise Conflict(f"app {name} already exists", app=name) from None
        return App(name=name, org_slug=org_slug, created_at=now)

    def get_app(self, name: str) -> App | None:
        rows = self._query("SELECT * FROM apps WHERE name = ?", (name,))
        return App(**dict(rows[0])) if rows else None

    def list_apps(self, org_slug: str | None) -> list[App]:
        if org_slug is None:
            rows = self._query("SELECT * FROM apps ORDER BY name")
        else:
            rows = self._query("SELECT * FROM apps WHERE org_slug = ? ORDER BY name", (org_slug,))
        return [App(**dict(row)) for row in rows]

    def delete_app(self, name: str) -> None:
        self._execute("DELETE FROM apps WHERE name = ?", (name,))

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
            machine.config.model_dump_json(exclude_defaults=False),
            machine.image_ref.model_dump_json(),
            machine.private_ip,
            machine.host_id,
            machine.failure_reason,
            machine.created_at,
            machine.updated_at,
        )

    @staticmethod
    def _machine_from(row: sqlite3.Row) -> Machine:
        values = dict(row)
        values["config"] = MachineConfig.model_validate_json(values["config"])
        values["image_ref"] = ImageRef.model_validate_json(values["image_ref"])
        values["state"] = MachineState(values["state"])
        return Machine(**values)

    def insert_machine(self, machine: Machine) -> None:
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO machines VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    self._machine_row(machine),
                )
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
        rows = self._query("SELECT * FROM machines WHERE id = ?", (machine_id,))
        return self._machine_from(rows[0]) if rows else None

    def list_machines(self, app: str | None, include_destroyed: bool = False) -> list[Machine]:
        sql = "SELECT * FROM machines WHERE 1=1"
        params: list[Any] = []
        if app is not None:
            sql += " AND app = ?"
            params.append(app)
        if not include_destroyed:
            sql += " AND state != 'destroyed'"
        rows = self._query(sql + " ORDER BY created_at", tuple(params))
        return [self._machine_from(row) for row in rows]

    def save_machine(self, machine: Machine) -> None:
        row = self._machine_row(machine)
        changed = self._execute(
            "UPDATE machines SET app=?, name=?, state=?, region=?, instance_id=?, version=?,"
            " config=?, image_ref=?, private_ip=?, host_id=?, failure_reason=?, created_at=?,"
            " updated_at=? WHERE id = ?",
            (*row[1:], row[0]),
        )
        if not changed:
            raise NotFound(f"machine {machine.id} not found", machine_id=machine.id)

    def set_image_ref(self, machine_id: str, image_ref: ImageRef, now: float) -> None:
        """Only the image reference: a concurrent metadata or config write is not lost."""
        self._execute(
            "UPDATE machines SET image_ref = ?, updated_at = ? WHERE id = ?",
            (image_ref.model_dump_json(), now, machine_id),
        )

    def set_state(
        self, machine_id: str, state: MachineState, now: float, reason: str = ""
    ) -> Machine:
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE machines SET state = ?, updated_at = ?, failure_reason = ? WHERE id = ?",
                (str(state), now, reason, machine_id),
            ).rowcount
        if not changed:
            raise NotFound(f"machine {machine_id} not found", machine_id=machine_id)
        machine = self.get_machine(machine_id)
        assert machine is not None
        return machine

    def save_config_version(self, machine: Machine, now: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE machine_versions SET replaced_at = ? WHERE machine_id = ?"
                " AND replaced_at IS NULL",
                (now, machine.id),
            )
            db.execute(
                "INSERT OR REPLACE INTO machine_versions VALUES (?, ?, ?, ?, NULL)",
                (machine.id, machine.version, machine.config.model_dump_json(), now),
            )
            db.execute(
                "UPDATE machines SET version = ?, config = ?, updated_at = ? WHERE id = ?",
                (machine.version, machine.config.model_dump_json(), now, machine.id),
            )

    def list_config_versions(self, machine_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT version, created_at, replaced_at FROM machine_versions"
            " WHERE machine_id = ? ORDER BY version",
            (machine_id,),
        )
        return [dict(row) for row in rows]

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

    # durable runs
    def insert_run(self, run: RunRecord) -> bool:
        """Insert unless a run with this id exists (False then): ids make submits idempotent."""
        return (
            self._execute(
                "INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?)",
                (run.id, run.machine_id, run.status, run.created_at, run.model_dump_json()),
            )
            == 1
        )

    def save_run(self, run: RunRecord) -> None:
        self._execute(
            "UPDATE runs SET status = ?, body = ? WHERE id = ?",
            (run.status, run.model_dump_json(), run.id),
        )

    def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._query("SELECT body FROM runs WHERE id = ?", (run_id,))
        return RunRecord.model_validate_json(rows[0]["body"]) if rows else None

    def list_runs(
        self, machine_id: str | None = None, unfinished_only: bool = False
    ) -> list[RunRecord]:
        sql = "SELECT body FROM runs WHERE 1=1"
        params: list[Any] = []
        if machine_id is not None:
            sql += " AND machine_id = ?"
            params.append(machine_id)
        if unfinished_only:
            sql += " AND status IN (?, ?)"
            params.extend(RunStatus.UNFINISHED)
        rows = self._query(sql + " ORDER BY created_at, rowid", tuple(params))
        return [RunRecord.model_validate_json(row["body"]) for row in rows]

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

    # GPUs
    @staticmethod
    def _gpu_row(gpu: GpuRecord) -> tuple[Any, ...]:
        return (
            gpu.bdf,
            gpu.host_id,
            gpu.kind,
            str(gpu.state),
            gpu.machine_id,
            gpu.model_dump_json(),
        )

    def upsert_gpu_inventory(self, gpu: GpuRecord) -> GpuRecord:
        """Register a GPU found on the host; an existing record keeps its state and claim."""
        with self.transaction() as db:
            row = db.execute("SELECT body FROM gpus WHERE bdf = ?", (gpu.bdf,)).fetchone()
            if row is not None:
                current = GpuRecord.model_validate_json(row["body"])
                gpu = current.model_copy(
                    update={
                        "kind": gpu.kind,
                        "numa_node": gpu.numa_node,
                        "nvlink_domain": gpu.nvlink_domain,
                        "iommu_group": gpu.iommu_group,
                        "host_id": gpu.host_id,
                        "available": gpu.available,
                        "reason": gpu.reason
                        if current.state != GpuState.QUARANTINED
                        else current.reason,
                    }
                )
            db.execute("INSERT OR REPLACE INTO gpus VALUES (?, ?, ?, ?, ?, ?)", self._gpu_row(gpu))
        return gpu

    def list_gpus(
        self, host_id: str | None = None, machine_id: str | None = None
    ) -> list[GpuRecord]:
        sql = "SELECT body FROM gpus WHERE 1=1"
        params: list[Any] = []
        if host_id is not None:
            sql += " AND host_id = ?"
            params.append(host_id)
        if machine_id is not None:
            sql += " AND machine_id = ?"
            params.append(machine_id)
        rows = self._query(sql + " ORDER BY bdf", tuple(params))
        return [GpuRecord.model_validate_json(row["body"]) for row in rows]

    def get_gpu(self, bdf: str) -> GpuRecord | None:
        rows = self._query("SELECT body FROM gpus WHERE bdf = ?", (bdf,))
        return GpuRecord.model_validate_json(rows[0]["body"]) if rows else None

    def claim_gpus(
        self,
        host_id: str,
        machine_id: str,
        kind: str,
        count: int,
        choose: Callable[[list[GpuRecord], int], list[GpuRecord] | None],
        now: float,
    ) -> list[GpuRecord] | None:
        """Atomically claim ``count`` free GPUs of ``kind`` for a machine; None if they don't fit.

        Idempotent: GPUs the machine already holds count towards ``count``.
        """
        with self.transaction() as db:
            rows = db.execute(
                "SELECT body FROM gpus WHERE host_id = ? AND (machine_id = ? OR state = ?)",
                (host_id, machine_id, str(GpuState.FREE)),
            ).fetchall()
            candidates = [GpuRecord.model_validate_json(row["body"]) for row in rows]
            held = [
                gpu
                for gpu in candidates
                if gpu.machine_id == machine_id and gpu.state == GpuState.CLAIMED
            ]
            if len(held) >= count:
                return held[:count]
            free = [
                gpu
                for gpu in candidates
                if gpu.state == GpuState.FREE and gpu.available and gpu.kind == kind
            ]
            chosen = choose(free, count - len(held))
            if chosen is None:
                return None
            claimed = []
            for gpu in chosen:
                updated = gpu.model_copy(
                    update={"state": GpuState.CLAIMED, "machine_id": machine_id, "updated_at": now}
                )
                changed = db.execute(
                    "UPDATE gpus SET state = ?, machine_id = ?, body = ?"
                    " WHERE bdf = ? AND state = ?",
                    (
                        str(GpuState.CLAIMED),
                        machine_id,
                        updated.model_dump_json(),
                        gpu.bdf,
                        str(GpuState.FREE),
                    ),
                ).rowcount
                if changed != 1:
                    raise Conflict(f"GPU {gpu.bdf} was claimed concurrently", bdf=gpu.bdf)
                claimed.append(updated)
            return held + claimed

    def update_gpu(self, gpu: GpuRecord, expected_state: GpuState | None = None) -> bool:
        """Write a GPU record; with ``expected_state``, only if it is still in that state."""
        with self.transaction() as db:
            if expected_state is None:
                changed = db.execute(
                    "UPDATE gpus SET state = ?, machine_id = ?, body = ? WHERE bdf = ?",
                    (str(gpu.state), gpu.machine_id, gpu.model_dump_json(), gpu.bdf),
                ).rowcount
            else:
                changed = db.execute(
                    "UPDATE gpus SET state = ?, machine_id = ?, body = ?"
                    " WHERE bdf = ? AND state = ?",
                    (
                        str(gpu.state),
                        gpu.machine_id,
                        gpu.model_dump_json(),
                        gpu.bdf,
                        str(expected_state),
                    ),
                ).rowcount
        return changed == 1

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
