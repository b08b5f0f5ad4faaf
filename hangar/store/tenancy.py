"""The embedded TenancyStore: orgs, API tokens and the audit log, in the same SQLite file as
the cluster state, through a connection of its own (WAL mode lets both write in turn)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hangar.errors import Conflict, NotFound
from hangar.store.protocol import ApiToken, AuditRecord, Org, OrgQuotas

SCHEMA = """
CREATE TABLE IF NOT EXISTS orgs (
    slug TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    quotas TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    org_slug TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS api_tokens_org ON api_tokens(org_slug);
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    org_slug TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_org ON audit_log(org_slug, seq);
"""


class SqliteTenancyStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
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

    # orgs
    @staticmethod
    def _org_from(row: sqlite3.Row) -> Org:
        return Org(
            slug=row["slug"],
            name=row["name"],
            created_at=row["created_at"],
            quotas=OrgQuotas.model_validate_json(row["quotas"]),
        )

    def create_org(self, slug: str, name: str, now: float) -> Org:
        org = Org(slug=slug, name=name, created_at=now)
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO orgs VALUES (?, ?, ?, ?)",
                    (slug, name, now, org.quotas.model_dump_json()),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"org {slug} already exists", org=slug) from None
        return org

    def ensure_org(self, slug: str, now: float) -> Org:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO orgs VALUES (?, ?, ?, ?)",
                (slug, slug, now, OrgQuotas().model_dump_json()),
            )
        org = self.get_org(slug)
        assert org is not None
        return org

    def get_org(self, slug: str) -> Org | None:
        rows = self._query("SELECT * FROM orgs WHERE slug = ?", (slug,))
        return self._org_from(rows[0]) if rows else None

    def list_orgs(self) -> list[Org]:
        return [self._org_from(row) for row in self._query("SELECT * FROM orgs ORDER BY slug")]

    def set_quotas(self, slug: str, quotas: OrgQuotas) -> Org:
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE orgs SET quotas = ? WHERE slug = ?", (quotas.model_dump_json(), slug)
            ).rowcount
        if not changed:
            raise NotFound(f"org {slug} not found", field="org_slug")
        org = self.get_org(slug)
        assert org is not None
        return org

    # tokens
    def insert_token(self, token: ApiToken, secret_hash: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO api_tokens VALUES (?, ?, ?, ?)",
                (token.id, secret_hash, token.org_slug, token.model_dump_json()),
            )

    def token_by_hash(self, secret_hash: str) -> ApiToken | None:
        rows = self._query("SELECT body FROM api_tokens WHERE secret_hash = ?", (secret_hash,))
        return ApiToken.model_validate_json(rows[0]["body"]) if rows else None

    def get_token(self, token_id: str) -> ApiToken | None:
        rows = self._query("SELECT body FROM api_tokens WHERE id = ?", (token_id,))
        return ApiToken.model_validate_json(rows[0]["body"]) if rows else None

    def list_tokens(self, org_slug: str | None = None) -> list[ApiToken]:
        if org_slug is None:
            rows = self._query("SELECT body FROM api_tokens ORDER BY rowid")
        else:
            rows = self._query(
                "SELECT body FROM api_tokens WHERE org_slug = ? ORDER BY rowid", (org_slug,)
            )
        return [ApiToken.model_validate_json(row["body"]) for row in rows]

    def revoke_token(self, token_id: str, now: float) -> ApiToken:
        with self._transaction() as db:
            row = db.execute("SELECT body FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                raise NotFound(f"token {token_id} not found", field="token_id")
            token = ApiToken.model_validate_json(row["body"])
            if token.revoked_at is None:
                token = token.model_copy(update={"revoked_at": now})
                db.execute(
                    "UPDATE api_tokens SET body = ? WHERE id = ?",
                    (token.model_dump_json(), token_id),
                )
        return token

    # audit log
    def add_audit(self, record: AuditRecord) -> AuditRecord:
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO audit_log (org_slug, body) VALUES (?, ?)",
                (record.org_slug, record.model_dump_json(exclude={"seq"})),
            )
            seq = cursor.lastrowid
        assert seq is not None
        return record.model_copy(update={"seq": seq})

    def list_audit(
        self, org_slug: str | None = None, limit: int = 100, before_seq: int | None = None
    ) -> list[AuditRecord]:
        sql = "SELECT seq, body FROM audit_log WHERE 1=1"
        params: list[Any] = []
        if org_slug is not None:
            sql += " AND org_slug = ?"
            params.append(org_slug)
        if before_seq is not None:
            sql += " AND seq < ?"
            params.append(before_seq)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(limit)
        return [
            AuditRecord.model_validate_json(row["body"]).model_copy(update={"seq": row["seq"]})
            for row in self._query(sql, tuple(params))
        ]
