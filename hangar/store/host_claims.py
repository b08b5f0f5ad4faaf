"""The scheduler's claim protocol on SQLite: one versioned record per host.

``compare_and_set`` is a single ``UPDATE ... WHERE version = ?``: of two schedulers that read
the same version, exactly one write changes a row. The etcd backend does the same with a
transaction comparing the key's version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hangar.model.gpu import GpuState
from hangar.scheduler import Claim, Gpu, HostState, NvlinkPartition, Pool, VersionedHost
from hangar.store.sqlite_db import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS host_states (
    host_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    body TEXT NOT NULL
);
"""


def host_state_to_json(host: HostState) -> str:
    """One host as JSON. A GPU's MIG layout (then whether it is fixed in MIG mode) and a
    claim's slice are written only when set, so hosts without MIG read the same in older
    versions."""
    return json.dumps(
        {
            "id": host.id,
            "region": host.region,
            "pool": str(host.pool),
            "cpu_milli": host.cpu_milli,
            "memory_mb": host.memory_mb,
            "zone": host.zone,
            "rack": host.rack,
            "allow_cpu_machines": host.allow_cpu_machines,
            "gpus": [
                [
                    gpu.index,
                    gpu.kind,
                    gpu.bdf,
                    gpu.numa_node,
                    gpu.nvlink_partition,
                    str(gpu.state),
                    gpu.iommu_group,
                    *([list(gpu.mig_layout)] if gpu.mig_layout else []),
                    *([True] if gpu.mig_fixed else []),
                ]
                for gpu in host.gpus
            ],
            "fabric_partitions": None
            if host.fabric_partitions is None
            else [[p.partition_id, list(p.gpu_indexes)] for p in host.fabric_partitions],
            "claims": [
                [
                    c.machine_id,
                    c.cpu_milli,
                    c.memory_mb,
                    list(c.gpu_indexes),
                    c.gpu_milli,
                    *([c.gpu_slice, c.mig_instance] if c.gpu_slice else []),
                ]
                for c in host.claims
            ],
        },
        separators=(",", ":"),
    )


def host_state_from_json(text: str) -> HostState:
    body: dict[str, Any] = json.loads(text)
    return HostState(
        id=body["id"],
        region=body["region"],
        pool=Pool(body["pool"]),
        cpu_milli=body["cpu_milli"],
        memory_mb=body["memory_mb"],
        zone=body["zone"],
        rack=body["rack"],
        allow_cpu_machines=body["allow_cpu_machines"],
        gpus=tuple(_gpu_from_json(row) for row in body["gpus"]),
        claims=tuple(_claim_from_json(row) for row in body["claims"]),
        fabric_partitions=None
        if body.get("fabric_partitions") is None
        else tuple(
            NvlinkPartition(partition_id, tuple(indexes))
            for partition_id, indexes in body["fabric_partitions"]
        ),
    )


def _gpu_from_json(row: list[Any]) -> Gpu:
    # A record written before IOMMU groups were kept has six fields; a MIG layout comes next,
    # then ``true`` for a GPU fixed in MIG mode (missing: not fixed, as records before it).
    index, kind, bdf, numa, partition, state, *rest = row
    group = rest[0] if rest else None
    layout = tuple(rest[1]) if len(rest) > 1 else ()
    fixed = bool(rest[2]) if len(rest) > 2 else False
    return Gpu(index, kind, bdf, numa, partition, GpuState(state), group, layout, fixed)


def _claim_from_json(row: list[Any]) -> Claim:
    machine_id, cpu, memory, indexes, milli, *rest = row
    gpu_slice, instance = (rest[0], rest[1]) if rest else ("", -1)
    return Claim(machine_id, cpu, memory, tuple(indexes), milli, gpu_slice, instance)


class SqliteClaimStore(SqliteDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def put_host(self, host: HostState) -> VersionedHost:
        """Register or replace a host unconditionally (inventory), bumping its version."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT version FROM host_states WHERE host_id = ?", (host.id,)
            ).fetchone()
            version = (row[0] + 1) if row else 1
            db.execute(
                "INSERT OR REPLACE INTO host_states VALUES (?, ?, ?)",
                (host.id, version, host_state_to_json(host)),
            )
        return VersionedHost(host, version)

    def snapshot(self) -> Mapping[str, VersionedHost]:
        rows = self._query("SELECT version, body FROM host_states")
        records = (VersionedHost(host_state_from_json(body), version) for version, body in rows)
        return {record.state.id: record for record in records}

    def read_host(self, host_id: str) -> VersionedHost | None:
        rows = self._query("SELECT version, body FROM host_states WHERE host_id = ?", (host_id,))
        return VersionedHost(host_state_from_json(rows[0][1]), rows[0][0]) if rows else None

    def compare_and_set(self, host_id: str, expected_version: int, new_state: HostState) -> bool:
        if new_state.id != host_id:
            raise ValueError(f"state of host {new_state.id} written under {host_id}")
        changed = self._execute(
            "UPDATE host_states SET version = ?, body = ? WHERE host_id = ? AND version = ?",
            (expected_version + 1, host_state_to_json(new_state), host_id, expected_version),
        )
        return changed == 1
