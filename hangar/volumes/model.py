"""What the volume library knows about a volume: its id, size, encryption and filesystem,
where a new one comes from, and what its image and snapshots look like on the host.

The API's and the store's records carry more (app, region, name, attachment); these types
carry only what the host-side operations need, so a record maps onto them field for field.
"""

from __future__ import annotations

import re
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hangar.errors import Unprocessable
from hangar.model.config import MAX_MOUNTS

GIB = 1 << 30
MIN_SIZE_GB = 1
MAX_SIZE_GB = 500
"""Fly's ceiling for one volume; the host's free space usually binds first."""
MAX_SNAPSHOTS_PER_VOLUME = 64
"""Snapshots share unchanged clusters with the volume, but each one pins what has changed
since: the count is bounded so a tenant cannot pin the host's disk without limit."""
MIN_RETENTION_DAYS = 1
MAX_RETENTION_DAYS = 60
DEFAULT_RETENTION_DAYS = 5
MAX_VOLUMES_PER_MACHINE = MAX_MOUNTS

_ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_ID_RANDOM_CHARS = 16
VOLUME_ID_PATTERN = re.compile(r"^vol_[0-9a-z]{16}$")
"""20 characters: the whole id fits a virtio-blk serial (20 bytes), which is how the guest
finds the volume's disk."""
SNAPSHOT_ID_PATTERN = re.compile(r"^vs_[0-9a-z]{16}$")

FsType = Literal["ext4"]
DEFAULT_FSTYPE: FsType = "ext4"


def _random_suffix() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_RANDOM_CHARS))


def new_volume_id() -> str:
    return f"vol_{_random_suffix()}"


def new_snapshot_id() -> str:
    return f"vs_{_random_suffix()}"


def check_volume_id(value: str) -> str:
    if not VOLUME_ID_PATTERN.fullmatch(value):
        raise ValueError(f"volume id {value!r} must match {VOLUME_ID_PATTERN.pattern}")
    return value


def check_snapshot_id(value: str) -> str:
    if not SNAPSHOT_ID_PATTERN.fullmatch(value):
        raise ValueError(f"snapshot id {value!r} must match {SNAPSHOT_ID_PATTERN.pattern}")
    return value


def size_bytes(size_gb: int) -> int:
    """Volume sizes are whole GiB, as Fly's ``size_gb``."""
    return size_gb * GIB


def check_size_gb(size_gb: int, field: str = "size_gb") -> None:
    """422 for a size outside ``MIN_SIZE_GB..MAX_SIZE_GB`` (free space is checked apart)."""
    if not MIN_SIZE_GB <= size_gb <= MAX_SIZE_GB:
        raise Unprocessable(
            f"{field} must be between {MIN_SIZE_GB} and {MAX_SIZE_GB} GB, not {size_gb}",
            field=field,
            size_gb=size_gb,
        )


def check_retention_days(days: int, field: str = "snapshot_retention") -> None:
    if not MIN_RETENTION_DAYS <= days <= MAX_RETENTION_DAYS:
        raise Unprocessable(
            f"{field} must be between {MIN_RETENTION_DAYS} and {MAX_RETENTION_DAYS} days, "
            f"not {days}",
            field=field,
        )


class VolumeSpec(BaseModel):
    """One volume as the host-side operations see it."""

    model_config = ConfigDict(frozen=True)

    id: str
    size_gb: int = Field(ge=MIN_SIZE_GB, le=MAX_SIZE_GB)
    encrypted: bool = True
    fstype: FsType = DEFAULT_FSTYPE

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return check_volume_id(value)

    @property
    def size_bytes(self) -> int:
        return size_bytes(self.size_gb)


class FromSnapshot(BaseModel):
    """A new volume restored from ``snapshot_id``, a snapshot of ``volume_id``."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["snapshot"] = "snapshot"
    volume_id: str
    snapshot_id: str

    @field_validator("volume_id")
    @classmethod
    def _volume_id(cls, value: str) -> str:
        return check_volume_id(value)

    @field_validator("snapshot_id")
    @classmethod
    def _snapshot_id(cls, value: str) -> str:
        return check_snapshot_id(value)


class ForkOf(BaseModel):
    """A new volume holding a copy of ``volume_id`` as it is when the fork starts."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["fork"] = "fork"
    volume_id: str

    @field_validator("volume_id")
    @classmethod
    def _volume_id(cls, value: str) -> str:
        return check_volume_id(value)


VolumeSource = FromSnapshot | ForkOf


class SnapshotInfo(BaseModel):
    """An internal snapshot inside a volume's image."""

    model_config = ConfigDict(frozen=True)

    id: str
    created_at: float
    """Seconds since the epoch, as QEMU stamped it when the snapshot was taken."""


class ImageInfo(BaseModel):
    """A volume's image file as ``qemu-img info`` reads it."""

    model_config = ConfigDict(frozen=True)

    virtual_size: int
    allocated_bytes: int
    """What the image costs on the host's disk (it is sparse)."""
    encrypted: bool
    snapshots: list[SnapshotInfo] = Field(default_factory=list)

    def snapshot(self, snapshot_id: str) -> SnapshotInfo | None:
        return next((s for s in self.snapshots if s.id == snapshot_id), None)
