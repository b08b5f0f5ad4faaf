"""The TenancyStore contract over every backend (SQLite beside the cluster store, etcd with
token hashes sealed): orgs, tokens by hash, network numbers, the audit log."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from hangar.errors import Conflict, NotFound
from hangar.store.etcd.tenancy import EtcdTenancyStore
from hangar.store.machines import SqliteMachineStore
from hangar.store.protocol import ApiToken, AuditRecord, OrgQuotas, TenancyStore, TokenKind
from hangar.store.tenancy import SqliteTenancyStore
from tests.fixtures.etcd import StoreScratch

TENANCY_BACKENDS: dict[str, Callable[[StoreScratch], TenancyStore]] = {
    "sqlite": lambda scratch: SqliteTenancyStore(scratch.tmp / "hangar.db"),
    "etcd": lambda scratch: EtcdTenancyStore(scratch.etcd_client(), scratch.sealer, scratch.layout),
}


@pytest.fixture(params=sorted(TENANCY_BACKENDS))
def store(request: pytest.FixtureRequest, store_scratch: StoreScratch) -> TenancyStore:
    return TENANCY_BACKENDS[request.param](store_scratch)


def test_orgs_are_created_once_and_keep_their_quotas(store: TenancyStore) -> None:
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


def test_tokens_are_found_by_hash_and_revoked_once(store: TenancyStore) -> None:
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


def test_audit_is_newest_first_per_org_and_pages(store: TenancyStore) -> None:
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


def test_network_numbers_are_one_org_each(store: TenancyStore) -> None:
    assert store.assign_network_number("acme", 7) == 7
    assert store.assign_network_number("acme", 9) == 7  # it keeps the one it has
    with pytest.raises(Conflict):
        store.assign_network_number("beta", 7)
    assert store.assign_network_number("beta", 8) == 8
    assert store.network_numbers() == {7: "acme", 8: "beta"}


def test_tokens_list_in_issue_order_per_org(store: TenancyStore) -> None:
    for number, org in enumerate(["acme", "beta", "acme"]):
        token = ApiToken(id=f"tok_{number}", kind=TokenKind.ORG, org_slug=org, created_at=1.0)
        store.insert_token(token, f"hash-{number}")
    assert [token.id for token in store.list_tokens("acme")] == ["tok_0", "tok_2"]
    assert [token.id for token in store.list_tokens()] == ["tok_0", "tok_1", "tok_2"]
