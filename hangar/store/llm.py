"""Model deployments, their API keys (hashed) and the tokens their requests used, in SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Protocol

from hangar.errors import Conflict
from hangar.model.llm import ApiKey, Deployment, TokenTotals, TokenUsage
from hangar.store.sqlite_db import SqliteDatabase


class LlmStore(Protocol):
    def insert_deployment(self, deployment: Deployment) -> None:
        """Raises ``Conflict`` when the org has a deployment of that name."""
        ...

    def get_deployment(self, deployment_id: str) -> Deployment | None: ...
    def deployment_named(self, org: str, name: str) -> Deployment | None: ...
    def list_deployments(self, org: str | None = None) -> list[Deployment]: ...
    def save_deployment(self, deployment: Deployment) -> None: ...
    def delete_deployment(self, deployment_id: str) -> None: ...

    def insert_key(self, key: ApiKey, secret_hash: str) -> None: ...
    def key_by_hash(self, secret_hash: str) -> ApiKey | None: ...

    def record_tokens(self, usage: TokenUsage) -> None: ...
    def token_totals(self, org: str, deployment: str | None = None) -> TokenTotals: ...
    def tokens_by_deployment(
        self, org: str, since: float, until: float
    ) -> dict[str, TokenTotals]: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_deployments (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (org, name)
);
CREATE TABLE IF NOT EXISTS llm_keys (
    id TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS llm_token_usage (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    org TEXT NOT NULL,
    deployment TEXT NOT NULL,
    token_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS llm_usage_org ON llm_token_usage(org, deployment, at);
"""


class SqliteLlmStore(SqliteDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def insert_deployment(self, deployment: Deployment) -> None:
        try:
            self._execute(
                "INSERT INTO llm_deployments (id, org, name, body) VALUES (?, ?, ?, ?)",
                (deployment.id, deployment.org, deployment.name, deployment.model_dump_json()),
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(
                f"org {deployment.org} already has a deployment named {deployment.name}",
                field="name",
            ) from exc

    @staticmethod
    def _deployment(rows: list[sqlite3.Row]) -> Deployment | None:
        return Deployment.model_validate_json(rows[0]["body"]) if rows else None

    def get_deployment(self, deployment_id: str) -> Deployment | None:
        return self._deployment(
            self._query("SELECT body FROM llm_deployments WHERE id = ?", (deployment_id,))
        )

    def deployment_named(self, org: str, name: str) -> Deployment | None:
        return self._deployment(
            self._query("SELECT body FROM llm_deployments WHERE org = ? AND name = ?", (org, name))
        )

    def list_deployments(self, org: str | None = None) -> list[Deployment]:
        sql = "SELECT body FROM llm_deployments"
        params: tuple[Any, ...] = ()
        if org is not None:
            sql += " WHERE org = ?"
            params = (org,)
        rows = self._query(sql + " ORDER BY org, name", params)
        return [Deployment.model_validate_json(row["body"]) for row in rows]

    def save_deployment(self, deployment: Deployment) -> None:
        self._execute(
            "UPDATE llm_deployments SET body = ? WHERE id = ?",
            (deployment.model_dump_json(), deployment.id),
        )

    def delete_deployment(self, deployment_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM llm_deployments WHERE id = ?", (deployment_id,))
            keys = db.execute("SELECT id, body FROM llm_keys").fetchall()
            for row in keys:
                if ApiKey.model_validate_json(row["body"]).deployment == deployment_id:
                    db.execute("DELETE FROM llm_keys WHERE id = ?", (row["id"],))

    def insert_key(self, key: ApiKey, secret_hash: str) -> None:
        self._execute(
            "INSERT INTO llm_keys (id, secret_hash, body) VALUES (?, ?, ?)",
            (key.id, secret_hash, key.model_dump_json()),
        )

    def key_by_hash(self, secret_hash: str) -> ApiKey | None:
        rows = self._query("SELECT body FROM llm_keys WHERE secret_hash = ?", (secret_hash,))
        return ApiKey.model_validate_json(rows[0]["body"]) if rows else None

    def record_tokens(self, usage: TokenUsage) -> None:
        u = usage
        self._execute(
            "INSERT INTO llm_token_usage (org, deployment, token_id, endpoint, prompt_tokens, "
            "completion_tokens, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                u.org,
                u.deployment,
                u.token_id,
                u.endpoint,
                u.prompt_tokens,
                u.completion_tokens,
                u.at,
            ),
        )

    def token_totals(self, org: str, deployment: str | None = None) -> TokenTotals:
        sql = (
            "SELECT COUNT(*) AS requests, COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, "
            "COALESCE(SUM(completion_tokens), 0) AS completion_tokens FROM llm_token_usage "
            "WHERE org = ?"
        )
        params: tuple[Any, ...] = (org,)
        if deployment is not None:
            sql += " AND deployment = ?"
            params += (deployment,)
        return TokenTotals.model_validate(dict(self._query(sql, params)[0]))

    def tokens_by_deployment(self, org: str, since: float, until: float) -> dict[str, TokenTotals]:
        """Totals per deployment of the requests served in ``[since, until)``."""
        rows = self._query(
            "SELECT deployment, COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, "
            "SUM(completion_tokens) AS completion_tokens FROM llm_token_usage "
            "WHERE org = ? AND at >= ? AND at < ? GROUP BY deployment ORDER BY deployment",
            (org, since, until),
        )
        return {
            row["deployment"]: TokenTotals.model_validate(
                {key: row[key] for key in ("requests", "prompt_tokens", "completion_tokens")}
            )
            for row in rows
        }
