"""One SQLite connection in WAL mode, shared by a process's threads behind a lock.

The database file (and the WAL and shared-memory files SQLite makes beside it with the same
mode) is readable by its owner alone: it holds tenants' configs, env and files."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class SqliteDatabase:
    """Base of the SQLite-backed stores: each passes the schema of its own tables."""

    def __init__(self, path: Path, schema: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        make_private_file(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        # What is deleted is overwritten, not left in free pages (a deleted app's secrets).
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(schema)

    def ensure_columns(self, table: str, columns: dict[str, str]) -> set[str]:
        """Add the columns a database made by an older hangar lacks (``name: declaration``);
        returns the names added (the database is upgraded in place)."""
        with self._lock:
            have = {row["name"] for row in self._db.execute(f"PRAGMA table_info({table})")}
            added = set()
            for name, declaration in columns.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")
                    added.add(name)
            return added

    def truncate_wal(self) -> None:
        """Copy the write-ahead log into the database and empty it, so that older versions
        of pages (which may hold deleted records) are gone from the log as well."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        with self.transaction() as db:
            return int(db.execute(sql, params).rowcount)


PRIVATE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def make_private_file(path: Path) -> None:
    """Create ``path`` mode 0600 if it is missing, and take group and other access away from
    it and from SQLite's companion files if an earlier version left them readable."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for suffix in PRIVATE_SUFFIXES:
        companion = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(companion).st_mode & 0o077:
                os.chmod(companion, 0o600)
