"""The one-process default: every store in one SQLite file under ``$HANGAR_HOME``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hangar.settings import SECRETS_KEY_FILE
from hangar.store.gpus import SqliteGpuStore
from hangar.store.host_claims import SqliteClaimStore
from hangar.store.llm import SqliteLlmStore
from hangar.store.machines import DEFAULT_KEEP_VERSIONS, SqliteMachineStore
from hangar.store.runs import SqliteRunStore
from hangar.store.secrets import SqliteSecretStore
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
    secrets: SqliteSecretStore
    usage: SqliteUsageStore
    volumes: SqliteVolumeStore
    llm: SqliteLlmStore

    def close(self) -> None:
        for store in (
            self.machines,
            self.runs,
            self.gpus,
            self.tenancy,
            self.claims,
            self.secrets,
            self.usage,
            self.volumes,
            self.llm,
        ):
            store.close()


def open_embedded_stores(
    path: Path,
    secrets_key: Path | None = None,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
) -> EmbeddedStores:
    """``secrets_key``: the key file app secrets are sealed with (default: ``secrets.key``
    beside the database; made on first use). ``keep_versions``: config versions, and
    finished runs, kept per machine."""
    return EmbeddedStores(
        machines=SqliteMachineStore(path, keep_versions=keep_versions),
        runs=SqliteRunStore(path, keep_finished=keep_versions),
        gpus=SqliteGpuStore(path),
        tenancy=SqliteTenancyStore(path),
        claims=SqliteClaimStore(path),
        secrets=SqliteSecretStore(path, secrets_key or path.parent / SECRETS_KEY_FILE),
        usage=SqliteUsageStore(path),
        volumes=SqliteVolumeStore(path),
        llm=SqliteLlmStore(path),
    )
