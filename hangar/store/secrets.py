"""The embedded SecretStore: apps' secrets in SQLite, each value sealed (AES-256-GCM) under a
key file of the server's.

A value is sealed by :class:`hangar.store.etcd.sealed.Sealer`, bound to its app and name (a
sealed value copied to another row does not open), and stored with a keyed digest (HMAC under
the same key), so a change shows without the value. The key file is created on first use,
mode 0600; a file others can read is refused. Values leave this module only through
:meth:`SqliteSecretStore.open_secrets`, for a machine's boot.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Mapping
from pathlib import Path

from hangar.errors import NotFound, Unprocessable
from hangar.store.etcd.sealed import MAX_PLAINTEXT_BYTES, Sealer
from hangar.store.protocol import SecretRecord
from hangar.store.sqlite_db import SqliteDatabase

SCHEMA = """
CREATE TABLE IF NOT EXISTS app_secrets (
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    sealed BLOB NOT NULL,
    digest TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (app, name)
);
CREATE TABLE IF NOT EXISTS app_secrets_versions (
    app TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
"""
MAX_SECRETS_PER_APP = 256
MAX_SECRET_BYTES = MAX_PLAINTEXT_BYTES
MAX_APP_SECRET_BYTES = 1024 * 1024
"""All of an app's values together: they become a machine's environment."""
DIGEST_CHARS = 16


def sealing_context(app: str, name: str) -> str:
    return f"app-secret/{app}/{name}"


class SqliteSecretStore(SqliteDatabase):
    def __init__(self, path: Path, key_file: Path) -> None:
        super().__init__(path, SCHEMA)
        self._key_file = key_file
        self._sealer: Sealer | None = None
        self._sealer_lock = threading.Lock()

    def _sealing(self) -> Sealer:
        with self._sealer_lock:
            if self._sealer is None:
                if not self._key_file.exists():
                    with contextlib.suppress(FileExistsError):  # made meanwhile elsewhere
                        Sealer.create_key_file(self._key_file)
                self._sealer = Sealer.from_key_files([self._key_file])
            return self._sealer

    def _digest(self, app: str, name: str, value: bytes) -> str:
        return self._sealing().lookup_name(value, f"secret digest {app}/{name}")[:DIGEST_CHARS]

    def update_secrets(self, app: str, values: Mapping[str, bytes | None], now: float) -> int:
        for name, value in values.items():
            if value is not None and len(value) > MAX_SECRET_BYTES:
                raise Unprocessable(
                    f"secret {name}: a value holds at most {MAX_SECRET_BYTES} bytes",
                    field="value",
                    secret=name,
                )
        sealer = self._sealing()
        sealed = {
            name: (sealer.seal(value, sealing_context(app, name)), self._digest(app, name, value))
            for name, value in values.items()
            if value is not None
        }
        with self.transaction() as db:
            for name, value in values.items():
                if value is None:
                    db.execute("DELETE FROM app_secrets WHERE app = ? AND name = ?", (app, name))
                    continue
                blob, digest = sealed[name]
                db.execute(
                    "INSERT INTO app_secrets VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (app, name) DO UPDATE SET sealed = excluded.sealed,"
                    " digest = excluded.digest, size = excluded.size,"
                    " updated_at = excluded.updated_at",
                    (app, name, blob, digest, len(value), now, now),
                )
            count, total = db.execute(
                "SELECT count(*), COALESCE(SUM(size), 0) FROM app_secrets WHERE app = ?", (app,)
            ).fetchone()
            if count > MAX_SECRETS_PER_APP:
                raise Unprocessable(
                    f"an app holds at most {MAX_SECRETS_PER_APP} secrets", field="values"
                )
            if total > MAX_APP_SECRET_BYTES:
                raise Unprocessable(
                    f"an app's secrets hold at most {MAX_APP_SECRET_BYTES} bytes together",
                    field="values",
                )
            db.execute(
                "INSERT INTO app_secrets_versions VALUES (?, 1)"
                " ON CONFLICT (app) DO UPDATE SET version = version + 1",
                (app,),
            )
            return int(
                db.execute(
                    "SELECT version FROM app_secrets_versions WHERE app = ?", (app,)
                ).fetchone()[0]
            )

    def list_secrets(self, app: str) -> list[SecretRecord]:
        rows = self._query(
            "SELECT name, digest, created_at, updated_at FROM app_secrets WHERE app = ?"
            " ORDER BY name",
            (app,),
        )
        return [SecretRecord(**dict(row)) for row in rows]

    def secrets_version(self, app: str) -> int:
        rows = self._query("SELECT version FROM app_secrets_versions WHERE app = ?", (app,))
        return int(rows[0]["version"]) if rows else 0

    def open_secrets(self, app: str, names: Collection[str] | None = None) -> dict[str, bytes]:
        rows = self._query("SELECT name, sealed FROM app_secrets WHERE app = ?", (app,))
        found = {row["name"]: bytes(row["sealed"]) for row in rows}
        if names is not None:
            missing = sorted(set(names) - set(found))
            if missing:
                raise NotFound(
                    f"app {app} has no secret named {', '.join(missing)}", field="secret_name"
                )
            found = {name: found[name] for name in names}
        sealer = self._sealing()
        return {name: sealer.open(blob, sealing_context(app, name)) for name, blob in found.items()}

    def delete_app_secrets(self, app: str) -> None:
        """Forget the app's secrets and their version (the deleted pages are overwritten and
        the write-ahead log emptied, as for the app's other records)."""
        with self.transaction() as db:
            db.execute("DELETE FROM app_secrets WHERE app = ?", (app,))
            db.execute("DELETE FROM app_secrets_versions WHERE app = ?", (app,))
        self.truncate_wal()
