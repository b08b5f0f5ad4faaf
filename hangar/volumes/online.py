"""Volume operations on a running machine, through its QEMU monitor (QMP).

While QEMU has a volume open, ``qemu-img`` must not write the image; these commands do the
same work inside QEMU, on the block node named after the volume (see
:mod:`hangar.vmm.qemu_argv`). After ``block_resize`` the guest sees its disk grow and grows
the filesystem by itself (hangar's guest init watches for the kernel's resize event).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hangar.clock import Clock
from hangar.errors import VolumeError
from hangar.vmm.errors import QmpError
from hangar.vmm.qemu_argv import volume_node_name
from hangar.vmm.qmp import qmp_execute
from hangar.volumes.model import VOLUME_ID_PATTERN

QMP_TIMEOUT_S = 30.0


async def _execute(
    qmp_socket: Path,
    command: str,
    arguments: dict[str, Any],
    *,
    volume_id: str,
    clock: Clock,
) -> object:
    try:
        return await qmp_execute(
            qmp_socket, command, arguments, clock=clock, timeout_s=QMP_TIMEOUT_S
        )
    except QmpError as error:
        raise VolumeError(
            f"volume {volume_id}: QMP {command} failed: {error}",
            retryable=True,
            volume_id=volume_id,
            command=command,
        ) from error


async def resize_online(qmp_socket: Path, volume_id: str, size: int, *, clock: Clock) -> None:
    await _execute(
        qmp_socket,
        "block_resize",
        {"node-name": volume_node_name(volume_id), "size": size},
        volume_id=volume_id,
        clock=clock,
    )


async def snapshot_online(qmp_socket: Path, volume_id: str, name: str, *, clock: Clock) -> None:
    """A qcow2 internal snapshot of the running disk: crash-consistent, as if power was cut
    at that instant (ext4's journal makes that a clean mount)."""
    await _execute(
        qmp_socket,
        "blockdev-snapshot-internal-sync",
        {"device": volume_node_name(volume_id), "name": name},
        volume_id=volume_id,
        clock=clock,
    )


async def delete_snapshot_online(
    qmp_socket: Path, volume_id: str, name: str, *, clock: Clock
) -> None:
    await _execute(
        qmp_socket,
        "blockdev-snapshot-delete-internal-sync",
        {"device": volume_node_name(volume_id), "name": name},
        volume_id=volume_id,
        clock=clock,
    )


async def volume_io_errors(qmp_socket: Path, *, clock: Clock) -> dict[str, str]:
    """Volumes whose last I/O failed, by volume id: ``nospace`` (the host's disk is full: the
    VM is paused with nothing lost, and goes on after ``resume_vm`` once space is freed) or
    ``failed``. Disks other than volumes are left out."""
    reply = await qmp_execute(qmp_socket, "query-block", clock=clock, timeout_s=QMP_TIMEOUT_S)
    errors: dict[str, str] = {}
    for device in reply if isinstance(reply, list) else []:
        status = device.get("io-status", "ok")
        node = device.get("inserted", {}).get("node-name", "")
        if status != "ok" and VOLUME_ID_PATTERN.fullmatch(node):
            errors[node] = str(status)
    return errors


def describe_io_errors(errors: dict[str, str]) -> str:
    """One line for the machine's events, from :func:`volume_io_errors`."""
    parts = []
    for volume_id, status in sorted(errors.items()):
        if status == "nospace":
            parts.append(
                f"volume {volume_id}: the host's disk is full; the machine is paused and "
                "goes on once space is freed"
            )
        else:
            parts.append(f"volume {volume_id}: I/O error ({status})")
    return "; ".join(parts)


async def resume_vm(qmp_socket: Path, *, clock: Clock) -> None:
    """``cont``: a VM paused on a full disk retries the write that failed."""
    await qmp_execute(qmp_socket, "cont", clock=clock, timeout_s=QMP_TIMEOUT_S)
