"""The read side of the UsageStore contract, over SQLite (what ``hangar server`` reads) and
etcd (what an API replica reads: an agent meters into its own SQLite and its
``UsagePublisher`` copies that to a real etcd): the same windows give the same intervals and
seconds, open and closed alike; republishing changes nothing; old usage is pruned."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hangar.clock import ManualClock
from hangar.errors import StoreRejected
from hangar.fleet.usage import UsagePublisher
from hangar.model.usage import UsageInterval, UsageSubject
from hangar.store.etcd.usage import DAY_S, EtcdUsageStore
from hangar.store.usage import SqliteUsageStore, UsageStore
from tests.fixtures.etcd import StoreScratch

HOST = "h1"


@dataclass
class Metered:
    """Where the agent writes (``local``) and where the API reads (``read``)."""

    local: SqliteUsageStore
    read: UsageStore
    publisher: UsagePublisher | None
    clock: ManualClock

    def sync(self, now: float) -> None:
        """Time moves to ``now``; the agent's publisher runs one cycle (etcd only)."""
        self.clock.advance(now - self.clock.now())
        if self.publisher is not None:
            self.publisher.publish_once()


def metered(backend: str, scratch: StoreScratch) -> Metered:
    local = SqliteUsageStore(scratch.tmp / "agent.db")
    clock = ManualClock(start=0.0)
    if backend == "sqlite":
        return Metered(local, local, None, clock)
    fleet = EtcdUsageStore(scratch.etcd_client(), scratch.layout)
    return Metered(local, fleet, UsagePublisher(fleet, local, HOST, clock, 10.0), clock)


@pytest.fixture(params=["sqlite", "etcd"])
def usage(request: pytest.FixtureRequest, store_scratch: StoreScratch) -> Metered:
    return metered(request.param, store_scratch)


def interval(
    interval_id: str, started_at: float, org: str = "acme", machine_id: str = "m1"
) -> UsageInterval:
    return UsageInterval(
        id=interval_id,
        subject=UsageSubject.MACHINE,
        org=org,
        app="web",
        machine_id=machine_id,
        host=HOST,
        region="local",
        cpu_kind="shared",
        cpus=2,
        memory_mb=512,
        started_at=started_at,
        until=started_at,
    )


def test_windows_give_the_same_intervals_and_seconds(usage: Metered) -> None:
    day = float(DAY_S)
    for name, start, end, org in [
        ("before", 0.0, 50.0, "acme"),
        ("across", 90.0, 120.0, "acme"),
        ("inside", 105.0, 110.0, "acme"),
        ("after", 200.0, 250.0, "acme"),
        ("other", 100.0, 150.0, "globex"),
        ("days", 300.0, 3 * day + 40.0, "acme"),
    ]:
        usage.local.open_interval(interval(name, start, org=org, machine_id=name))
        usage.local.close_interval(name, end)
    usage.sync(3 * day + 60.0)
    store = usage.read
    assert [i.id for i in store.intervals("acme", 100.0, 200.0)] == ["across", "inside"]
    assert [i.id for i in store.intervals(None, 100.0, 200.0)] == ["across", "other", "inside"]
    assert store.intervals("acme", 100.0, 200.0)[0].seconds_within(100.0, 200.0) == 20.0
    assert store.intervals("acme", 200.0, 100.0) == []
    for since, until, seconds in [
        (day + 5.0, 2 * day + 7.0, day + 2.0),
        (250.0, 4 * day, 3 * day - 260.0),
        (3 * day + 40.0, 4 * day, None),
    ]:
        found = {i.id: i for i in store.intervals("acme", since, until)}
        if seconds is None:
            assert "days" not in found
        else:
            assert found["days"].seconds_within(since, until) == seconds
            assert found["days"].closed
    whole = store.get_interval("days")
    assert whole is not None and (whole.started_at, whole.until) == (300.0, 3 * day + 40.0)
    assert store.get_interval("nothing") is None


def test_open_intervals_follow_the_agent(usage: Metered) -> None:
    usage.local.open_interval(interval("a", 100.0))
    usage.local.open_interval(interval("b", 100.0, machine_id="m2"))
    usage.local.checkpoint(["a", "b"], 130.0)
    usage.sync(131.0)
    assert [(i.id, i.until) for i in usage.read.open_intervals(HOST)] == [
        ("a", 130.0),
        ("b", 130.0),
    ]
    assert [i.id for i in usage.read.open_intervals(HOST, machine_id="m2")] == ["b"]
    assert usage.read.open_intervals("h2") == []
    # "a" stops; "b" is closed by the agent's recovery at its last checkpoint (older than the
    # last cycle); "c" opens and stops between two cycles.
    usage.local.checkpoint(["a"], 140.0)
    usage.local.close_interval("a", 150.0)
    usage.local.close_interval("b", None)
    usage.local.open_interval(interval("c", 160.0, machine_id="m3"))
    usage.local.close_interval("c", 170.0)
    usage.sync(171.0)
    assert usage.read.open_intervals(HOST) == []
    closed = {i.id: i for i in usage.read.intervals("acme", 0.0, 1000.0)}
    assert {k: (v.until, v.closed) for k, v in closed.items()} == {
        "a": (150.0, True),
        "b": (130.0, True),
        "c": (170.0, True),
    }


def test_republishing_changes_nothing_and_old_usage_is_pruned(store_scratch: StoreScratch) -> None:
    client = store_scratch.etcd_client()
    usage = metered("etcd", store_scratch)
    assert usage.publisher is not None and isinstance(usage.read, EtcdUsageStore)
    fleet = usage.read
    day = float(DAY_S)
    usage.local.open_interval(interval("old", 10.0))
    usage.local.close_interval("old", 2 * day + 10.0)
    usage.local.open_interval(interval("new", 5 * day, machine_id="m2"))
    usage.sync(5 * day + 1)

    def stored() -> dict[str, bytes]:
        return {kv.key: kv.value for kv in client.range_prefix(store_scratch.layout.prefix).kvs}

    before = stored()
    for name in ("old", "new"):
        found = usage.local.get_interval(name)
        assert found is not None
        fleet.publish(found)
    assert stored() == before, "publishing the same intervals again writes the same values"

    assert fleet.prune(3 * day) == 1
    assert fleet.get_interval("old") is None and fleet.get_interval("new") is not None
    assert fleet.intervals("acme", 0.0, 3 * day) == []
    assert [i.id for i in fleet.intervals("acme", 0.0, 6 * day)] == ["new"]
    with pytest.raises(StoreRejected, match="agent"):
        fleet.open_interval(interval("x", 1.0))
