"""The rules of attaching volumes to machines, and what a machine's mounts become in the guest.

A volume is attached to one machine at a time, and only while that machine is not running:
QEMU's disks are fixed at launch, so an attach or detach takes effect at the next start, and
asking for one while the machine runs is refused with a 409 rather than done half-way.
"""

from __future__ import annotations

from collections.abc import Sequence

from hangar.errors import Conflict, Unprocessable
from hangar.images.run_config import GuestVolume
from hangar.volumes.model import MAX_VOLUMES_PER_MACHINE, FsType, VolumeSpec


def check_attach(
    volume_id: str, machine_id: str, *, attached_to: str | None, machine_running: bool
) -> None:
    if attached_to is not None and attached_to != machine_id:
        raise Conflict(
            f"volume {volume_id} is attached to machine {attached_to}; detach it first",
            volume_id=volume_id,
            machine_id=machine_id,
            attached_to=attached_to,
        )
    if machine_running:
        raise Conflict(
            f"cannot attach volume {volume_id} to machine {machine_id} while it runs; "
            "stop the machine first",
            volume_id=volume_id,
            machine_id=machine_id,
        )


def check_detach(
    volume_id: str, machine_id: str, *, attached_to: str | None, machine_running: bool
) -> None:
    if attached_to != machine_id:
        raise Conflict(
            f"volume {volume_id} is not attached to machine {machine_id}",
            volume_id=volume_id,
            machine_id=machine_id,
            attached_to=attached_to,
        )
    if machine_running:
        raise Conflict(
            f"cannot detach volume {volume_id} from machine {machine_id} while it runs; "
            "stop the machine first",
            volume_id=volume_id,
            machine_id=machine_id,
        )


def check_mount_count(count: int, field: str = "config.mounts") -> None:
    if count > MAX_VOLUMES_PER_MACHINE:
        raise Unprocessable(
            f"{field}: a machine mounts at most {MAX_VOLUMES_PER_MACHINE} volumes, not {count}",
            field=field,
        )


def guest_volume(volume_id: str, path: str, fstype: FsType = "ext4") -> GuestVolume:
    """One of ``config.mounts`` as init reads it (``GuestRunConfig.volumes``)."""
    try:
        return GuestVolume(serial=volume_id, path=path, fstype=fstype)
    except ValueError as error:
        raise Unprocessable(
            f"config.mounts: {path!r} is not a usable mount path", field="config.mounts.path"
        ) from error


def guest_volumes(mounts: Sequence[tuple[VolumeSpec, str]]) -> list[GuestVolume]:
    """``(volume, path)`` pairs in the machine's order, checked."""
    check_mount_count(len(mounts))
    return [guest_volume(spec.id, path, spec.fstype) for spec, path in mounts]
