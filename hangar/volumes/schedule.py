"""Daily snapshots and their retention, decided from the snapshots there are and the time now.

A volume gets a scheduled snapshot when none was scheduled within the last day; every
snapshot (scheduled or taken on request, as on Fly) is removed once it is older than the
volume's ``snapshot_retention`` days. The decision is pure over the caller's snapshot records
and the time of the injected clock, so tests move a clock instead of waiting days (the
timestamps QEMU writes into the image follow the wall clock and are not used here).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from hangar.volumes.host import VolumeHost
from hangar.volumes.model import SnapshotInfo, check_retention_days, new_snapshot_id

DAY_S = 86_400.0
SNAPSHOT_INTERVAL_S = DAY_S


@dataclass(frozen=True)
class SnapshotDecision:
    take: bool
    expire: list[str]


def decide_snapshots(
    snapshots: Sequence[SnapshotInfo],
    scheduled: Collection[str],
    retention_days: int,
    now: float,
) -> SnapshotDecision:
    """``scheduled``: the ids of the snapshots that were taken by the schedule."""
    check_retention_days(retention_days)
    cutoff = now - retention_days * DAY_S
    expire = [snapshot.id for snapshot in snapshots if snapshot.created_at <= cutoff]
    last_scheduled = max(
        (s.created_at for s in snapshots if s.id in scheduled and s.id not in expire),
        default=None,
    )
    take = last_scheduled is None or now - last_scheduled >= SNAPSHOT_INTERVAL_S
    return SnapshotDecision(take=take, expire=expire)


@dataclass(frozen=True)
class SnapshotMaintenance:
    taken: SnapshotInfo | None
    expired: list[str]


async def maintain_snapshots(
    host: VolumeHost,
    volume_id: str,
    snapshots: Sequence[SnapshotInfo],
    scheduled: Collection[str],
    retention_days: int,
    *,
    qmp_socket: Path | None = None,
) -> SnapshotMaintenance:
    """Apply :func:`decide_snapshots` at ``host.clock``'s time to the volume's snapshot
    records (``snapshots``, their times from the same clock): expire first (it frees room
    under the snapshot bound), then take the day's snapshot. Returns what changed, for the
    caller to record."""
    now = host.clock.now()
    decision = decide_snapshots(snapshots, scheduled, retention_days, now)
    for snapshot_id in decision.expire:
        await host.delete_snapshot_plan(volume_id, snapshot_id, qmp_socket=qmp_socket).execute()
    taken = None
    if decision.take:
        taken = SnapshotInfo(id=new_snapshot_id(), created_at=now)
        host.check_snapshot(volume_id)
        await host.snapshot_plan(volume_id, taken.id, qmp_socket=qmp_socket).execute()
    return SnapshotMaintenance(taken=taken, expired=decision.expire)
