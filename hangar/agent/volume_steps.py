"""Volume steps: those of a volume's own runs (subject ``vol:VOLUME_ID``), and those by which a
machine's boot attaches its volumes (and mounts them on the host, for a sandbox machine) and
its release unmounts and detaches them.

A volume operation's plan (``hangar.agent.operations``) is the image library's
(:mod:`hangar.volumes.host`) step for step, under the same names, with the record's changes
around it:

- ``volume_create``: ``create_key`` (encrypted), ``create_image`` | ``freeze_source``,
  ``copy_image``, ``release_source`` (a fork) | ``copy_image`` (from a snapshot), then
  ``mark_volume_created``; rollback: the library's ``undo_*`` steps, ``mark_volume_destroyed``.
- ``volume_extend``: ``resize_image``, ``grow_filesystem`` (a volume this host mounted for a
  sandbox machine), ``record_volume_size``.
- ``volume_snapshot``: ``take_snapshot``, ``record_snapshot``; rollback ``undo_take_snapshot``.
- ``volume_delete_snapshot``: ``delete_snapshot``, ``forget_snapshot``.
- ``volume_delete``: ``mark_volume_destroying`` (refused while attached, in the same
  compare-and-set), ``check_not_in_use``, ``delete_key``, ``delete_image``,
  ``mark_volume_destroyed``; rollback ``restore_volume``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hangar.agent.context import StepContext
from hangar.agent.host import HostServices
from hangar.agent.volumes import HostVolumes, running_qmp
from hangar.errors import VolumeError
from hangar.model.config import Tier
from hangar.model.run import (
    VOLUME_SUBJECT_PREFIX,
    VolumeCreateRequest,
    VolumeDeleteRequest,
    VolumeDeleteSnapshotRequest,
    VolumeExtendRequest,
    VolumeRequest,
    VolumeSnapshotRequest,
)
from hangar.model.volume import VolumeSnapshotRecord, VolumeState
from hangar.store.volume_claims import (
    attach_volume,
    attached_to,
    change_volume,
    detach_volume,
    forget_snapshot,
    move_volume,
    record_snapshot,
)
from hangar.vmm.snapshot import has_snapshot
from hangar.volumes import ForkOf, FromSnapshot, VolumePlan, VolumeSource, VolumeSpec, VolumeStep
from hangar.volumes.model import size_bytes


def host_volumes(host: HostServices) -> HostVolumes:
    if host.volumes is None:
        raise VolumeError(
            "this host keeps no volumes (no volume store configured)", retryable=False
        )
    return host.volumes


def volume_of(subject: str) -> str:
    if not subject.startswith(VOLUME_SUBJECT_PREFIX):
        raise ValueError(f"{subject} is not a volume")
    return subject.removeprefix(VOLUME_SUBJECT_PREFIX)


def source_of(request: VolumeCreateRequest) -> VolumeSource | None:
    if request.snapshot_id is not None:
        assert request.source_volume_id is not None, "the API names the snapshot's volume"
        return FromSnapshot(volume_id=request.source_volume_id, snapshot_id=request.snapshot_id)
    if request.source_volume_id is not None:
        return ForkOf(volume_id=request.source_volume_id)
    return None


def library_plan(
    volumes: HostVolumes,
    request: VolumeRequest,
    volume_id: str,
    qmp: Path | None = None,
    source_qmp: Path | None = None,
) -> VolumePlan:
    """The image library's plan for ``request``; ``qmp``/``source_qmp``: the monitor of the
    running machine that has the volume (a fork's source) open, if one has."""
    library = volumes.host
    match request:
        case VolumeCreateRequest():
            spec = VolumeSpec(
                id=volume_id,
                size_gb=request.size_gb,
                encrypted=request.encrypted,
                fstype=request.fstype,
            )
            return library.create_plan(spec, source_of(request), source_qmp=source_qmp)
        case VolumeExtendRequest():
            return library.extend_plan(volume_id, request.size_gb, qmp_socket=qmp)
        case VolumeSnapshotRequest():
            return library.snapshot_plan(volume_id, request.snapshot_id, qmp_socket=qmp)
        case VolumeDeleteSnapshotRequest():
            return library.delete_snapshot_plan(volume_id, request.snapshot_id, qmp_socket=qmp)
        case VolumeDeleteRequest():
            return library.delete_plan(volume_id)
    raise ValueError(f"no volume plan for {request!r}")


@dataclass(frozen=True)
class ImageStep:
    """The image library's step ``name`` of the run's plan. The library's plan is built
    afresh each time the step is asked, under the volume's lock: whether a running machine
    has the volume (or a fork's source) open is decided then, not when the run began."""

    host: HostServices
    request: VolumeRequest
    volume_id: str
    name: str

    def _volume_ids(self) -> list[str]:
        source = (
            self.request.source_volume_id if isinstance(self.request, VolumeCreateRequest) else None
        )
        return [self.volume_id] + ([source] if source else [])

    def _step(self, ctx: StepContext) -> VolumeStep:
        volumes = host_volumes(self.host)
        qmp = running_qmp(volumes, ctx.runs, self.host.platform, self.volume_id)
        source_qmp = None
        if isinstance(self.request, VolumeCreateRequest) and self.request.source_volume_id:
            source_qmp = running_qmp(
                volumes, ctx.runs, self.host.platform, self.request.source_volume_id
            )
        plan = library_plan(volumes, self.request, self.volume_id, qmp, source_qmp)
        for step in (*plan.steps, *plan.rollback):
            if step.name == self.name:
                return step
        raise ValueError(f"the {plan.operation} plan of {self.volume_id} has no step {self.name}")

    async def should_run(self, ctx: StepContext) -> bool:
        async with host_volumes(self.host).locked(self._volume_ids()):
            return await self._step(ctx).should_run()

    async def run(self, ctx: StepContext) -> None:
        async with host_volumes(self.host).locked(self._volume_ids()):
            step = self._step(ctx)
            if await step.should_run():
                await step.run()


@dataclass(frozen=True)
class MoveVolume:
    """Move the volume's record to ``state`` from one of ``expected``; ``with_reason``: the
    run's error is the record's ``failure_reason``; ``detached_only``: refused (409) while a
    machine has it attached. A destroyed volume stays so."""

    host: HostServices
    volume_id: str
    name: str
    state: VolumeState
    expected: frozenset[VolumeState]
    with_reason: bool = False
    detached_only: bool = False

    async def should_run(self, ctx: StepContext) -> bool:
        state = host_volumes(self.host).record(self.volume_id).state
        return state not in (self.state, VolumeState.DESTROYED)

    async def run(self, ctx: StepContext) -> None:
        move_volume(
            host_volumes(self.host).store,
            self.volume_id,
            self.state,
            ctx.clock.now(),
            expected=self.expected,
            reason=ctx.run.error if self.with_reason else "",
            detached_only=self.detached_only,
        )


@dataclass(frozen=True)
class RestoreVolume:
    """A delete that failed: the volume is ``created`` again if its image and key are whole,
    else ``failed`` (its key is gone: its data cannot be read any more)."""

    host: HostServices
    volume_id: str
    name: str = "restore_volume"

    async def should_run(self, ctx: StepContext) -> bool:
        return host_volumes(self.host).record(self.volume_id).state is VolumeState.DESTROYING

    async def run(self, ctx: StepContext) -> None:
        volumes = host_volumes(self.host)
        record = volumes.record(self.volume_id)
        library = volumes.host
        intact = library.exists(self.volume_id) and (
            not record.encrypted or library.keys.exists(self.volume_id)
        )
        move_volume(
            volumes.store,
            self.volume_id,
            VolumeState.CREATED if intact else VolumeState.FAILED,
            ctx.clock.now(),
            expected={VolumeState.DESTROYING},
            reason="" if intact else f"delete failed half-way: {ctx.run.error}",
        )


@dataclass(frozen=True)
class RecordVolumeSize:
    host: HostServices
    volume_id: str
    size_gb: int
    name: str = "record_volume_size"

    async def should_run(self, ctx: StepContext) -> bool:
        return host_volumes(self.host).record(self.volume_id).size_gb < self.size_gb

    async def run(self, ctx: StepContext) -> None:
        change_volume(
            host_volumes(self.host).store,
            self.volume_id,
            lambda volume: volume.model_copy(update={"size_gb": max(volume.size_gb, self.size_gb)}),
            ctx.clock.now(),
        )


@dataclass(frozen=True)
class RecordSnapshot:
    host: HostServices
    volume_id: str
    snapshot_id: str
    scheduled: bool
    name: str = "record_snapshot"

    async def should_run(self, ctx: StepContext) -> bool:
        return host_volumes(self.host).record(self.volume_id).snapshot(self.snapshot_id) is None

    async def run(self, ctx: StepContext) -> None:
        volumes = host_volumes(self.host)
        now = ctx.clock.now()
        snapshot = VolumeSnapshotRecord(
            id=self.snapshot_id,
            created_at=now,
            size_bytes=size_bytes(volumes.record(self.volume_id).size_gb),
            scheduled=self.scheduled,
        )
        record_snapshot(volumes.store, self.volume_id, snapshot, now)


@dataclass(frozen=True)
class ForgetSnapshot:
    host: HostServices
    volume_id: str
    snapshot_id: str
    name: str = "forget_snapshot"

    async def should_run(self, ctx: StepContext) -> bool:
        record = host_volumes(self.host).record(self.volume_id)
        return record.snapshot(self.snapshot_id) is not None

    async def run(self, ctx: StepContext) -> None:
        store = host_volumes(self.host).store
        forget_snapshot(store, self.volume_id, self.snapshot_id, ctx.clock.now())


# --- a machine's volumes --------------------------------------------------------------


@dataclass(frozen=True)
class AttachVolumes:
    """Claim each volume of the machine's ``config.mounts`` for it, by compare-and-set on
    the volume's record: of two machines racing for one volume exactly one gets it; the
    other's start fails here (409), before anything was launched."""

    host: HostServices
    name: str = "attach_volumes"

    async def should_run(self, ctx: StepContext) -> bool:
        machine = ctx.machine()
        if not machine.config.mounts:
            return False
        volumes = host_volumes(self.host)
        records = [volumes.store.get_volume(mount.volume) for mount in machine.config.mounts]
        return any(r is None or r.attached_machine_id != machine.id for r in records)

    async def run(self, ctx: StepContext) -> None:
        machine = ctx.machine()
        volumes = host_volumes(self.host)
        for mount in machine.config.mounts:
            attach_volume(
                volumes.store,
                mount.volume,
                machine.id,
                app=machine.app,
                host_id=volumes.host_id,
                now=ctx.clock.now(),
            )


@dataclass(frozen=True)
class DetachVolumes:
    """Let go of every volume the machine has attached (its VMM is gone by now).
    ``keep_if_restarting``: an exit whose restart policy boots the machine again keeps them;
    ``keep_if_suspended``: a machine with a whole suspend snapshot keeps them (its saved
    guest has them mounted; the start that restores it opens them again)."""

    host: HostServices
    keep_if_restarting: bool = False
    keep_if_suspended: bool = False
    name: str = "detach_volumes"

    async def should_run(self, ctx: StepContext) -> bool:
        if self.keep_if_restarting and ctx.run.progress.restart_decision == "restart":
            return False
        if self.keep_if_suspended and has_snapshot(self.host.suspend_state(ctx.run.machine_id)):
            return False
        if self.host.volumes is None:
            return False
        machine = ctx.machine()
        return bool(attached_to(self.host.volumes.store, machine.app, machine.id))

    async def run(self, ctx: StepContext) -> None:
        volumes = host_volumes(self.host)
        machine = ctx.machine()
        for volume in attached_to(volumes.store, machine.app, machine.id):
            detach_volume(volumes.store, volume.id, machine.id, ctx.clock.now())


@dataclass(frozen=True)
class MountVolumes:
    """A sandbox-tier machine's volumes mounted on this host, for its container to bind
    (:mod:`hangar.volumes.host_mount`); a VM's guest mounts its own."""

    host: HostServices
    name: str = "mount_volumes"

    async def should_run(self, ctx: StepContext) -> bool:
        machine = ctx.machine()
        if machine.tier is not Tier.SANDBOX or not machine.config.mounts:
            return False
        return not host_volumes(self.host).mounted_for(machine)

    async def run(self, ctx: StepContext) -> None:
        await host_volumes(self.host).mount_on_host(ctx.machine())


@dataclass(frozen=True)
class UnmountVolumes:
    """Unmount what this host mounted for the machine's container (which has ended by now):
    every volume recorded as mounted for it, whatever its config says now."""

    host: HostServices
    name: str = "unmount_volumes"

    async def should_run(self, ctx: StepContext) -> bool:
        if self.host.volumes is None:
            return False
        return bool(self.host.volumes.host.mounts.owned_by(ctx.run.machine_id))

    async def run(self, ctx: StepContext) -> None:
        await host_volumes(self.host).unmount_from_host(ctx.run.machine_id)
