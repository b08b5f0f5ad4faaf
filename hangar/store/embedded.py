"""The one-process default: every store in one SQLite file under ``$HANGAR_HOME``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hangar.store.gpus import SqliteGpuStore
from hangar.store.host_claims import SqliteClaimStore
from hangar.store.machines import DEFAULT_KEEP_VERSIONS, SqliteMachineStore
from hangar.store.runs import SqliteRunStore
from hangar.store.tenancy import SqliteTenancyStore
from hangar.store.usage import SqliteUsageStore
from hangar.store.volumes import SqliteVolumeStore


@dataclass(frozen=True)
class EmbeddedStores:
    machines: SqliteMachineStore
    runs: SqliteRunStore
    gpus: SqliteGpuStore
    tenancy: SqliteTenancyStore
    claims: SqliteClaimStore
    usage: SqliteUsageStore
    volumes: SqliteVolumeStore

    def close(self) -> None:
        for store in (
            self.machines,
            self.runs,
            self.gpus,
            self.tenancy,
            self.claims,
            self.usage,
            self.volumes,
        ):
            store.close()


def open_embedded_stores(path: Path, keep_versions: int = DEFAULT_KEEP_VERSIONS) -> EmbeddedStores:
    return EmbeddedStores(
        machines=SqliteMachineStore(path, keep_versions=keep_versions),
        runs=SqliteRunStore(path, keep_finished=keep_versions),
        gpus=SqliteGpuStore(path),
        tenancy=SqliteTenancyStore(path),
        claims=SqliteClaimStore(path),
        usage=SqliteUsageStore(path),
        volumes=SqliteVolumeStore(path),
    )
