"""Request and response bodies of the volumes API, shaped as Fly's (``/v1/apps/{app}/volumes``):
``vol_...`` ids, ``state``, ``attached_machine_id``, ``blocks*``, ``host_status``."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from hangar.api.schemas import Body, iso8601
from hangar.errors import UnsupportedField
from hangar.model.config import GuestConfig
from hangar.model.volume import Volume, VolumeSnapshotRecord
from hangar.volumes.model import (
    GIB,
    MAX_RETENTION_DAYS,
    MAX_SIZE_GB,
    MIN_RETENTION_DAYS,
    MIN_SIZE_GB,
    ImageInfo,
)

VOLUME_NAME_PATTERN = re.compile(r"^[a-z0-9_]{1,30}$")
BLOCK_SIZE = 4096


def _volume_name(value: str) -> str:
    if not VOLUME_NAME_PATTERN.match(value):
        raise ValueError("must be 1-30 characters: lowercase letters, digits and '_'")
    return value


SizeGb = Annotated[int, Field(ge=MIN_SIZE_GB, le=MAX_SIZE_GB)]
RetentionDays = Annotated[int, Field(ge=MIN_RETENTION_DAYS, le=MAX_RETENTION_DAYS)]
ShortId = Annotated[str, Field(min_length=1, max_length=64)]


class CreateVolumeRequest(Body):
    name: str
    region: Annotated[str, Field(max_length=32)] | None = None
    size_gb: SizeGb | None = None
    """Default: the source's size for a restore or a fork, else 1."""
    encrypted: bool = True
    fstype: Literal["ext4"] = "ext4"
    snapshot_retention: RetentionDays | None = None
    require_unique_zone: bool = False
    source_volume_id: ShortId | None = None
    """Fork this volume (of the same app) as it is now."""
    snapshot_id: ShortId | None = None
    """Restore from this snapshot (of a volume of the same app)."""
    compute: GuestConfig | None = None
    """A machine the volume is for: it is made only where such a machine fits."""
    machines_only: bool | None = None
    """Volumes here are always for machines."""

    _name = field_validator("name")(_volume_name)

    @field_validator("machines_only")
    @classmethod
    def _machines_only(cls, value: bool | None) -> bool | None:
        if value is False:
            raise UnsupportedField("machines_only", "must be true: volumes are for machines")
        return value


class UpdateVolumeRequest(Body):
    snapshot_retention: RetentionDays | None = None
    auto_backup_enabled: bool | None = None


class ExtendVolumeRequest(Body):
    size_gb: SizeGb


class VolumeView(BaseModel):
    id: str
    name: str
    state: str
    size_gb: int
    region: str
    zone: str
    encrypted: bool
    attached_machine_id: str | None
    attached_alloc_id: str | None = None
    created_at: str
    blocks: int
    block_size: int
    blocks_free: int
    blocks_avail: int
    """The host's view: blocks the image has not yet taken on the host's disk (hangar does
    not read the guest's filesystem)."""
    fstype: str
    snapshot_retention: int
    auto_backup_enabled: bool
    host_status: str
    """``ok``, or ``unknown`` when the image could not be read on its host."""
    source_volume_id: str | None = None
    snapshot_id: str | None = None
    failure_reason: str = ""

    @classmethod
    def of(cls, volume: Volume, image: ImageInfo | None) -> VolumeView:
        blocks = volume.size_gb * GIB // BLOCK_SIZE
        free = 0
        if image is not None:
            free = max(0, image.virtual_size - image.allocated_bytes) // BLOCK_SIZE
        return cls(
            id=volume.id,
            name=volume.name,
            state=str(volume.state),
            size_gb=volume.size_gb,
            region=volume.region,
            zone=volume.zone,
            encrypted=volume.encrypted,
            attached_machine_id=volume.attached_machine_id,
            created_at=iso8601(volume.created_at),
            blocks=blocks,
            block_size=BLOCK_SIZE,
            blocks_free=min(free, blocks),
            blocks_avail=min(free, blocks),
            fstype=volume.fstype,
            snapshot_retention=volume.snapshot_retention,
            auto_backup_enabled=volume.auto_backup_enabled,
            host_status="ok" if image is not None else "unknown",
            source_volume_id=volume.source_volume_id,
            snapshot_id=volume.snapshot_id,
            failure_reason=volume.failure_reason,
        )


class ExtendVolumeResponse(BaseModel):
    volume: VolumeView
    needs_restart: bool = False
    """A VM's volume grows at once (QMP ``block_resize``, then ``resize2fs`` in the guest), a
    stopped machine's at its next mount: no restart. A running sandbox machine's volume is
    mounted by the host, which grows it at once where ext4 may be resized online and at the
    next start elsewhere: then this is true."""


class VolumeSnapshotView(BaseModel):
    id: str
    created_at: str
    digest: str = ""
    size: int
    """The volume's size in bytes when it was taken."""
    status: str = "created"
    retention_days: int
    scheduled: bool
    """Taken by the daily schedule (else on request)."""

    @classmethod
    def of(cls, snapshot: VolumeSnapshotRecord, retention_days: int) -> VolumeSnapshotView:
        return cls(
            id=snapshot.id,
            created_at=iso8601(snapshot.created_at),
            size=snapshot.size_bytes,
            retention_days=retention_days,
            scheduled=snapshot.scheduled,
        )
