"""Requests without a token cannot fill the host's disk through the audit log: they are
rate-limited per client address, a record stores bounded values, and old records expire."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from hangar.api.services.audit import MAX_TARGET_CHARS, MAX_VALUE_CHARS, AuditService
from hangar.clock import ManualClock
from hangar.store.tenancy import SqliteTenancyStore
from tests.fixtures.inprocess import InProcessServer

FLOOD = 200
LONG = "x" * 60_000


def database_bytes(server: InProcessServer) -> int:
    """The database file's size, its write-ahead log copied in."""
    server.embedded.stores.tenancy.truncate_wal()
    return (server.home / "hangar.db").stat().st_size


def test_an_anonymous_flood_with_long_paths_stays_small(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with InProcessServer(tmp_path, anonymous_rate_limit="5/20") as server:
        before = database_bytes(server)
        statuses: dict[int, int] = {}
        started = time.monotonic()
        with caplog.at_level(logging.WARNING), server.client(anonymous=True) as anonymous:
            for _ in range(FLOOD):
                status = anonymous.post(f"/v1/apps/{LONG}/machines", json={}).status_code
                statuses[status] = statuses.get(status, 0) + 1
        # A burst of 20, then 5 a second: the rest are refused before anything is written.
        allowed = 20 + 5 * (time.monotonic() - started) + 1
        assert statuses.get(401, 0) <= allowed and statuses.get(429, 0) >= FLOOD - allowed, statuses
        with server.client() as operator:
            records = operator.get("/v1/audit", params={"limit": 1000}).json()["records"]
            anonymous_records = [r for r in records if r["token_id"] == ""]
            assert len(anonymous_records) == statuses[401]
            for record in anonymous_records:
                assert len(record["app_name"]) <= MAX_VALUE_CHARS
                assert len(record["target"]) <= MAX_TARGET_CHARS
                assert "60000 chars" in record["app_name"]
            # A token-bearing client is not limited by the anonymous flood.
            assert operator.get("/v1/apps").status_code == 200
        grown = database_bytes(server) - before
        assert grown < 256 * 1024, f"{grown} bytes for {FLOOD} refused requests"
    floods = [r for r in caplog.records if "flood from" in r.getMessage()]
    assert len(floods) == 1, [r.getMessage() for r in floods]


def test_audit_records_past_the_retention_are_deleted(tmp_path: Path) -> None:
    clock = ManualClock()
    store = SqliteTenancyStore(tmp_path / "db")
    audit = AuditService(store, clock, retention_s=3600)
    audit.record(None, "acme", "create_app", {"app_name": "old"}, 201, "ok")
    clock.advance(3601)
    audit.record(None, "acme", "create_app", {"app_name": "new"}, 201, "ok")
    assert audit.prune() == 1
    assert [record.app_name for record in store.list_audit()] == ["new"]
