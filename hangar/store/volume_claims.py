"""The changes hangar makes to volume records, each one compare-and-set over any
:class:`~hangar.store.protocol.VolumeStore`: read the record, decide, write it only if
nobody wrote in between, else decide again on the newer record.

The attach claim is the one that matters most: a volume is attached to one machine at a
time, so of two machines racing for it exactly one wins and the other gets a 409.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from hangar.errors import Conflict, NotFound, StoreError
from hangar.model.volume import Volume, VolumeSnapshotRecord, VolumeState
from hangar.store.protocol import VolumeStore
from hangar.volumes.attach import check_attach

MAX_CAS_ATTEMPTS = 16


def volume_not_found(volume_id: str, app: str | None = None) -> NotFound:
    """The one answer for a volume that does not exist or that the caller may not know of."""
    where = f" in app {app}" if app else ""
    return NotFound(f"volume {volume_id} not found{where}", volume_id=volume_id)


def change_volume(
    store: VolumeStore,
    volume_id: str,
    change: Callable[[Volume], Volume | None],
    now: float,
) -> Volume:
    """Apply ``change`` to the newest record and write the result by compare-and-set.
    ``change`` returns the new record, or None to leave it as it is; it raises to refuse.
    Returns the record as stored."""
    for _ in range(MAX_CAS_ATTEMPTS):
        current = store.get_volume(volume_id)
        if current is None:
            raise volume_not_found(volume_id)
        changed = change(current)
        if changed is None or changed == current:
            return current
        changed = changed.model_copy(update={"version": current.version, "updated_at": now})
        if store.compare_and_set_volume(changed):
            return changed.model_copy(update={"version": current.version + 1})
    raise StoreError(f"volume {volume_id}: every compare-and-set lost a race", volume_id=volume_id)


def attach_volume(
    store: VolumeStore, volume_id: str, machine_id: str, *, app: str, host_id: str, now: float
) -> Volume:
    """Claim the volume for ``machine_id`` (of ``app``, booting on ``host_id``): it must be
    ``created``, of that app, on that host, and attached to no other machine. Attaching it
    again to the machine that has it is a no-op."""

    def claim(volume: Volume) -> Volume | None:
        if volume.app != app:
            raise volume_not_found(volume_id, app)
        if volume.state is not VolumeState.CREATED:
            raise Conflict(
                f"volume {volume_id} is {volume.state}, not created; it cannot be attached",
                volume_id=volume_id,
                state=str(volume.state),
            )
        if volume.host_id != host_id:
            raise Conflict(
                f"volume {volume_id} is on host {volume.host_id}; machine {machine_id} is "
                f"on host {host_id}",
                volume_id=volume_id,
                host_id=volume.host_id,
            )
        check_attach(
            volume_id, machine_id, attached_to=volume.attached_machine_id, machine_running=False
        )
        if volume.attached_machine_id == machine_id:
            return None
        return volume.model_copy(update={"attached_machine_id": machine_id})

    return change_volume(store, volume_id, claim, now)


def detach_volume(store: VolumeStore, volume_id: str, machine_id: str, now: float) -> Volume:
    """Let go of the volume if ``machine_id`` has it (else leave it as it is)."""

    def release(volume: Volume) -> Volume | None:
        if volume.attached_machine_id != machine_id:
            return None
        return volume.model_copy(update={"attached_machine_id": None})

    return change_volume(store, volume_id, release, now)


def attached_to(store: VolumeStore, app: str, machine_id: str) -> list[Volume]:
    """The volumes ``machine_id`` (of ``app``) has attached."""
    return [v for v in store.list_volumes(app) if v.attached_machine_id == machine_id]


def move_volume(
    store: VolumeStore,
    volume_id: str,
    state: VolumeState,
    now: float,
    *,
    expected: Collection[VolumeState],
    reason: str = "",
    detached_only: bool = False,
) -> Volume:
    """Move the volume to ``state`` if it is in one of ``expected`` (``Conflict`` if not;
    a no-op if it is in ``state`` already). ``detached_only``: refuse (409) while a machine
    has it attached, in the same compare-and-set (a delete cannot race an attach)."""

    def move(volume: Volume) -> Volume | None:
        if volume.state is state:
            return None
        if volume.state not in expected:
            raise Conflict(
                f"volume {volume_id} is {volume.state}; cannot make it {state}",
                volume_id=volume_id,
                state=str(volume.state),
            )
        if detached_only and volume.attached_machine_id is not None:
            raise Conflict(
                f"volume {volume_id} is attached to machine {volume.attached_machine_id}; "
                "destroy that machine (or change its mounts) first",
                volume_id=volume_id,
                attached_to=volume.attached_machine_id,
            )
        return volume.model_copy(update={"state": state, "failure_reason": reason})

    return change_volume(store, volume_id, move, now)


def record_snapshot(
    store: VolumeStore, volume_id: str, snapshot: VolumeSnapshotRecord, now: float
) -> Volume:
    def add(volume: Volume) -> Volume | None:
        if volume.snapshot(snapshot.id) is not None:
            return None
        return volume.model_copy(update={"snapshots": [*volume.snapshots, snapshot]})

    return change_volume(store, volume_id, add, now)


def forget_snapshot(store: VolumeStore, volume_id: str, snapshot_id: str, now: float) -> Volume:
    def remove(volume: Volume) -> Volume | None:
        if volume.snapshot(snapshot_id) is None:
            return None
        kept = [s for s in volume.snapshots if s.id != snapshot_id]
        return volume.model_copy(update={"snapshots": kept})

    return change_volume(store, volume_id, remove, now)
