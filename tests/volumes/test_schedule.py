"""Daily snapshots and retention, with a clock moved by days instead of waited for."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from hangar.clock import ManualClock
from hangar.errors import Unprocessable
from hangar.volumes.model import SnapshotInfo, VolumeSpec, new_volume_id
from hangar.volumes.schedule import DAY_S, decide_snapshots, maintain_snapshots
from tests.volumes.helpers import new_host

NOW = 1_800_000_000.0


def snap(snapshot_id: str, age_days: float) -> SnapshotInfo:
    return SnapshotInfo(id=snapshot_id, created_at=NOW - age_days * DAY_S)


def test_a_snapshot_is_due_when_none_was_scheduled_within_a_day() -> None:
    assert decide_snapshots([], set(), 5, NOW).take
    assert not decide_snapshots([snap("a", 0.5)], {"a"}, 5, NOW).take
    assert decide_snapshots([snap("a", 1.0)], {"a"}, 5, NOW).take
    # one taken on request does not stand in for the daily one
    assert decide_snapshots([snap("m", 0.1)], set(), 5, NOW).take


def test_snapshots_older_than_the_retention_expire_whoever_took_them() -> None:
    snapshots = [snap("old", 6), snap("edge", 5), snap("young", 4.9), snap("manual", 7)]
    decision = decide_snapshots(snapshots, {"old", "edge", "young"}, 5, NOW)
    assert decision.expire == ["old", "edge", "manual"]
    assert decision.take  # the youngest scheduled one is 4.9 days old


def test_retention_is_bounded() -> None:
    for days in (0, 61):
        with pytest.raises(Unprocessable):
            decide_snapshots([], set(), days, NOW)


def test_maintenance_takes_daily_snapshots_and_expires_old_ones(tmp_path: Path) -> None:
    clock = ManualClock(start=time.time())
    host = new_host(tmp_path / "volumes", clock=clock)
    spec = VolumeSpec(id=new_volume_id(), size_gb=1, encrypted=False)
    asyncio.run(host.create_plan(spec).execute())
    records: list[SnapshotInfo] = []

    def tick() -> tuple[str | None, list[str]]:
        done = asyncio.run(
            maintain_snapshots(host, spec.id, records, {r.id for r in records}, retention_days=2)
        )
        records[:] = [r for r in records if r.id not in done.expired]
        if done.taken:
            records.append(done.taken)
        return (done.taken.id if done.taken else None), done.expired

    first, _ = tick()
    assert first is not None
    assert tick() == (None, [])  # the same day: nothing to do
    clock.advance(DAY_S)
    second, _ = tick()
    assert second is not None
    clock.advance(DAY_S + 1)
    third, expired = tick()
    assert expired == [first]
    assert third is not None
    assert [s.id for s in host.snapshots(spec.id)] == [second, third]
