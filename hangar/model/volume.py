"""Volumes as the store records them: which app owns one, where it lives, how big it is,
which machine has it attached and which snapshots it keeps.

A volume lives on one host (its image file is there) and is attached to at most one machine
at a time, that machine on the same host. Every change to a record is a compare-and-set on
its ``version`` (``hangar.store.volume_claims``), so two machines racing for one volume
cannot both win. What the host-side operations need of a record is
``hangar.volumes.VolumeSpec``.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, Field


class VolumeState(enum.StrEnum):
    CREATING = "creating"
    """A blank image is being made."""
    RESTORING = "restoring"
    """Being made from a snapshot."""
    HYDRATING = "hydrating"
    """Being made as a copy (fork) of another volume."""
    CREATED = "created"
    """Ready: may be attached, extended, snapshotted, deleted."""
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    """An operation left it unusable (``failure_reason`` says why); it can only be deleted."""

    @property
    def being_made(self) -> bool:
        return self in BEING_MADE

    @property
    def holds_space(self) -> bool:
        """Counts against the org's volume quotas: anything that has or will have an image."""
        return self not in (VolumeState.DESTROYED, VolumeState.FAILED)


BEING_MADE = frozenset({VolumeState.CREATING, VolumeState.RESTORING, VolumeState.HYDRATING})


class VolumeSnapshotRecord(BaseModel):
    """A snapshot inside the volume's image (a qcow2 internal snapshot)."""

    id: str
    created_at: float
    """The agent's clock when it was taken: daily snapshots and retention go by it."""
    size_bytes: int
    """The volume's size when it was taken (a volume restored from it is at least this)."""
    scheduled: bool = False
    """Taken by the daily schedule, not on request."""


class Volume(BaseModel):
    id: str
    name: str
    app: str
    region: str
    zone: str = ""
    host_id: str
    size_gb: int
    encrypted: bool = True
    fstype: str = "ext4"
    state: VolumeState
    attached_machine_id: str | None = None
    snapshot_retention: int
    """Days a snapshot is kept (scheduled or taken on request)."""
    auto_backup_enabled: bool = True
    """Take a snapshot daily."""
    source_volume_id: str | None = None
    """The volume this one was restored or forked from."""
    snapshot_id: str | None = None
    """The snapshot this one was restored from."""
    snapshots: list[VolumeSnapshotRecord] = Field(default_factory=list)
    failure_reason: str = ""
    created_at: float
    updated_at: float
    version: int = 0
    """Bumped by every write; writes are compare-and-set on it."""

    def snapshot(self, snapshot_id: str) -> VolumeSnapshotRecord | None:
        return next((s for s in self.snapshots if s.id == snapshot_id), None)
