"""The SQLite tenancy store: orgs, tokens by hash, the audit log, next to the cluster store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hangar.errors import Conflict, NotFound
from hangar.store.machines import SqliteMachineStore
from hangar.store.protocol import ApiToken, AuditRecord, OrgQuotas, TokenKind
from hangar.store.tenancy import SqliteTenancyStore


@pytest.fixture
def store(tmp_path: Path) -> SqliteTenancyStore:
    return SqliteTenancyStore(tmp_path / "hangar.db")


def test_orgs_are_created_once_and_keep_their_quotas(store: SqliteTenancyStore) -> None:
    store.create_org("acme", "Acme", 1.0)
    with pytest.raises(Conflict):
        store.create_org("acme", "Again", 2.0)
    assert store.ensure_org("acme", 3.0).name == "Acme"
    assert store.ensure_org("beta", 3.0).created_at == 3.0
    quotas = OrgQuotas(machines=2, memory_mb=1024, gpus={"l40s": 1})
    assert store.set_quotas("acme", quotas).quotas == quotas
    assert [org.slug for org in store.list_orgs()] == ["acme", "beta"]
    with pytest.raises(NotFound):
        store.set_quotas("nobody", quotas)


def test_tokens_are_found_by_hash_and_revoked_once(store: SqliteTenancyStore) -> None:
    token = ApiToken(id="tok_1", kind=TokenKind.ORG, org_slug="acme", created_at=1.0)
    store.insert_token(token, "hash-1")
    assert store.token_by_hash("hash-1") == token
    assert store.token_by_hash("hash-2") is None
    revoked = store.revoke_token("tok_1", 5.0)
    assert revoked.revoked_at == 5.0
    assert store.revoke_token("tok_1", 9.0).revoked_at == 5.0
    assert store.get_token("tok_1") == revoked
    assert store.list_tokens("other") == []
    with pytest.raises(NotFound):
        store.revoke_token("tok_none", 1.0)


def test_audit_is_newest_first_per_org_and_pages(store: SqliteTenancyStore) -> None:
    for number in range(5):
        store.add_audit(
            AuditRecord(
                timestamp=float(number),
                token_id="tok_1",
                org_slug="acme" if number % 2 == 0 else "beta",
                action=f"action_{number}",
                target="",
                outcome="ok",
                status=200,
            )
        )
    acme = store.list_audit("acme")
    assert [record.action for record in acme] == ["action_4", "action_2", "action_0"]
    older = store.list_audit("acme", limit=1, before_seq=acme[0].seq)
    assert [record.action for record in older] == ["action_2"]
    assert len(store.list_audit(None, limit=4)) == 4


def test_shares_the_cluster_database_file(tmp_path: Path) -> None:
    database = tmp_path / "hangar.db"
    cluster = SqliteMachineStore(database)
    tenancy = SqliteTenancyStore(database)
    cluster.create_app("web", "acme", 1.0)
    tenancy.ensure_org("acme", 1.0)
    tables = {row[0] for row in sqlite3.connect(database).execute("SELECT name FROM sqlite_master")}
    assert {"apps", "orgs", "api_tokens", "audit_log"} <= tables
