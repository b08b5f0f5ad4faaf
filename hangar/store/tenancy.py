"""The embedded TenancyStore: orgs, API tokens and the audit log, in the same SQLite file as
the cluster state, through a connection of its own (WAL mode lets both write in turn)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from hangar.errors import Conflict, NotFound
from hangar.store.protocol import ApiToken, AuditRecord, Org, OrgQuotas
from hangar.store.sqlite_db import SqliteDatabase

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
CREATE TABLE IF NOT EXISTS org_networks (
    slug TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE
);
"""


class SqliteTenancyStore(SqliteDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    # orgs
    @staticmethod
    def _org_from(row: sqlite3.Row) -> Org:
        return Org(
            slug=row["slug"],
            name=row["name"],
            created_at=row["created_at"],
            quotas=OrgQuotas.model_validate_json(row["quotas"]),
        )

    def create_org(self, slug: str, name: str, now: float, quotas: OrgQuotas | None = None) -> Org:
        org = Org(slug=slug, name=name, created_at=now, quotas=quotas or OrgQuotas())
        try:
            with self.transaction() as db:
                db.execute(
                    "INSERT INTO orgs VALUES (?, ?, ?, ?)",
                    (slug, name, now, org.quotas.model_dump_json()),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"org {slug} already exists", org=slug) from None
        return org

    def ensure_org(self, slug: str, now: float, quotas: OrgQuotas | None = None) -> Org:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO orgs VALUES (?, ?, ?, ?)",
                (slug, slug, now, (quotas or OrgQuotas()).model_dump_json()),
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
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE orgs SET quotas = ? WHERE slug = ?", (quotas.model_dump_json(), slug)
            ).rowcount
        if not changed:
            raise NotFound(f"org {slug} not found", field="org_slug")
        org = self.get_org(slug)
        assert org is not None
        return org

    # private networks
    def network_numbers(self) -> dict[int, str]:
        rows = self._query("SELECT number, slug FROM org_networks")
        return {row["number"]: row["slug"] for row in rows}

    def assign_network_number(self, slug: str, number: int) -> int:
        """The org's network number: ``number`` if it had none (and no other org has it),
        else the one it has. Conflict if another org holds ``number``."""
        try:
            with self.transaction() as db:
                db.execute("INSERT OR IGNORE INTO org_networks VALUES (?, ?)", (slug, number))
                row = db.execute(
                    "SELECT number FROM org_networks WHERE slug = ?", (slug,)
                ).fetchone()
        except sqlite3.IntegrityError:
            raise Conflict(f"network number {number} is taken", org=slug, retryable=True) from None
        if row is None:  # OR IGNORE also skipped the insert: another org holds the number
            raise Conflict(f"network number {number} is taken", org=slug, retryable=True)
        return int(row["number"])

    # tokens
    def insert_token(self, token: ApiToken, secret_hash: str) -> None:
        with self.transaction() as db:
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
        with self.transaction() as db:
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
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO audit_log (org_slug, body) VALUES (?, ?)",
                (record.org_slug, record.model_dump_json(exclude={"seq"})),
            )
            seq = cursor.lastrowid
        assert seq is not None
        return record.model_copy(update={"seq": seq})

    def prune_audit(self, before: float) -> int:
        with self.transaction() as db:
            return int(
                db.execute(
                    "DELETE FROM audit_log WHERE json_extract(body, '$.timestamp') < ?", (before,)
                ).rowcount
            )

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
