"""The SQLite usage store: every write can be repeated after a crash without changing the
totals (open is insert-once, checkpoints only move forward, a closed interval stays closed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hangar.model.usage import UsageInterval, UsageSubject
from hangar.store.usage import SqliteUsageStore


@pytest.fixture
def store(tmp_path: Path) -> SqliteUsageStore:
    return SqliteUsageStore(tmp_path / "hangar.db")


def interval(
    interval_id: str, started_at: float, org: str = "acme", machine_id: str = "m1"
) -> UsageInterval:
    return UsageInterval(
        id=interval_id,
        subject=UsageSubject.MACHINE,
        org=org,
        app="web",
        machine_id=machine_id,
        host="h1",
        region="local",
        cpu_kind="shared",
        cpus=2,
        memory_mb=512,
        started_at=started_at,
        until=started_at,
    )


def test_an_interval_opens_once_and_moves_only_forward(store: SqliteUsageStore) -> None:
    assert store.open_interval(interval("m1.1.1", 100.0))
    assert not store.open_interval(interval("m1.1.1", 150.0))
    store.checkpoint(["m1.1.1"], 130.0)
    store.checkpoint(["m1.1.1"], 120.0)
    opened = store.get_interval("m1.1.1")
    assert opened is not None
    assert (opened.started_at, opened.until, opened.closed) == (100.0, 130.0, False)
    assert [i.id for i in store.open_intervals("h1")] == ["m1.1.1"]
    assert [i.id for i in store.open_intervals("h1", machine_id="m2")] == []
    assert store.open_intervals("h2") == []


def test_closing_twice_never_extends_and_none_closes_at_the_last_checkpoint(
    store: SqliteUsageStore,
) -> None:
    store.open_interval(interval("a", 100.0))
    store.checkpoint(["a"], 110.0)
    assert store.close_interval("a", None)
    assert not store.close_interval("a", 500.0)
    store.checkpoint(["a"], 900.0)
    closed = store.get_interval("a")
    assert closed is not None and closed.closed and closed.until == 110.0
    store.open_interval(interval("b", 100.0, machine_id="m2"))
    store.checkpoint(["b"], 140.0)
    assert store.close_interval("b", 120.0)
    closed_early = store.get_interval("b")
    assert closed_early is not None and closed_early.until == 140.0
    assert not store.close_interval("nothing", 1.0)
    assert store.open_intervals("h1") == []


def test_the_window_query_returns_what_overlaps_per_org(store: SqliteUsageStore) -> None:
    for name, start, end, org in [
        ("before", 0.0, 50.0, "acme"),
        ("across", 90.0, 120.0, "acme"),
        ("inside", 105.0, 110.0, "acme"),
        ("after", 200.0, 250.0, "acme"),
        ("other", 100.0, 150.0, "globex"),
    ]:
        store.open_interval(interval(name, start, org=org))
        store.close_interval(name, end)
    assert [i.id for i in store.intervals("acme", 100.0, 200.0)] == ["across", "inside"]
    assert [i.id for i in store.intervals(None, 100.0, 200.0)] == ["across", "other", "inside"]
    across = store.intervals("acme", 100.0, 200.0)[0]
    assert across.seconds_within(100.0, 200.0) == 20.0
