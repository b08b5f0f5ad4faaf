"""The steps machine operations are made of. Each is idempotent: ``should_run`` looks at the
world (records, files, processes, the host's claims) and ``run`` brings it one step closer to
the plan's goal. Each is built with exactly the inputs it needs (``operations.plan_for``)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hangar.agent.context import StepContext
from hangar.agent.gpu_steps import gpu_boot, record_claimed, release_gpus_for_handoff
from hangar.agent.host import HostServices
from hangar.agent.platform import BootSecrets, GuestNetwork, GuestPlatform
from hangar.agent.secrets import boot_secrets
from hangar.agent.slices import sandbox_gpu
from hangar.agent.volume_steps import host_volumes
from hangar.errors import VmmError
from hangar.model.config import MachineConfig, Tier
from hangar.model.guest_contract import RunDir
from hangar.model.machine import Machine, MachineState, new_ulid, rfc3339
from hangar.model.run import (
    DestroyRequest,
    RunRecord,
    RunRequest,
    RunStatus,
    StartRequest,
)
from hangar.vmm.container import ContainerMount
from hangar.vmm.driver import VolumeDiskSpec
from hangar.vmm.errors import SnapshotUnusable
from hangar.vmm.sandbox import rootfs_dir
from hangar.vmm.snapshot import SnapshotFiles, drop_snapshot, has_snapshot

RESTART_WINDOW_S = 300.0


def new_run(
    machine_id: str, request: RunRequest, now: float, run_id: str | None = None
) -> RunRecord:
    return RunRecord(
        id=run_id or new_ulid(now),
        machine_id=machine_id,
        request=request,
        status=RunStatus.RUNNING,
        created_at=now,
        updated_at=now,
    )


@dataclass(frozen=True)
class Transition:
    """Move the machine to ``state`` unless it is there already."""

    name: str
    state: MachineState
    event_type: str

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machine().state != self.state

    async def run(self, ctx: StepContext) -> None:
        ctx.transition(self.state, self.event_type)


@dataclass(frozen=True)
class ResolveImage:
    """Find the image's digest and have it in the cache; ``fresh`` resolves it again even
    when a digest is known (create and update look the tag up anew)."""

    platform: GuestPlatform
    fresh: bool = False
    name: str = "resolve_image"

    async def should_run(self, ctx: StepContext) -> bool:
        if self.fresh and not ctx.run.progress.image_resolved:
            return True
        image_ref = ctx.machine().image_ref
        return not image_ref.digest or not self.platform.image_cached(image_ref)

    async def run(self, ctx: StepContext) -> None:
        machine = ctx.machine()
        app = ctx.machines.get_app(machine.app)
        owner = app.org_slug if app is not None else machine.app
        image_ref = await self.platform.resolve_image(machine.config.image, owner=owner)
        ctx.machines.set_image_ref(ctx.run.machine_id, image_ref, ctx.clock.now())
        ctx.run.progress.image_resolved = True


@dataclass(frozen=True)
class PlaceMachine:
    """Claim the machine's CPUs, memory and GPUs on this host through the scheduler."""

    host: HostServices
    name: str = "place_machine"

    async def should_run(self, ctx: StepContext) -> bool:
        return self.host.placement.claim_of(ctx.run.machine_id) is None

    async def run(self, ctx: StepContext) -> None:
        self.host.placement.place(ctx.run.machine_id, ctx.machine().config.guest)
        record_claimed(self.host, ctx)


@dataclass(frozen=True)
class ReleaseClaim:
    """Give back what the machine holds on this host; its GPUs go to a handoff (reset and
    verified before anyone else gets them). ``keep_if_restarting``: an exit whose restart
    policy boots the machine again keeps its claim, GPUs included. ``unless_vm_recorded``:
    kept while a VM handle is recorded (a suspend rolled back to a guest that runs on)."""

    host: HostServices
    keep_if_restarting: bool = False
    unless_vm_recorded: bool = False
    name: str = "release_claim"

    async def should_run(self, ctx: StepContext) -> bool:
        if self.keep_if_restarting and ctx.run.progress.restart_decision == "restart":
            return False
        if self.unless_vm_recorded and ctx.runs.get_vm_handle(ctx.run.machine_id) is not None:
            return False
        return self.host.placement.claim_of(ctx.run.machine_id) is not None

    async def run(self, ctx: StepContext) -> None:
        released = self.host.placement.release(ctx.run.machine_id)
        # A GPU that other slices or shares still hold stays theirs; the last one out hands
        # it off (and stops its MPS daemon).
        idle = [bdf for bdf in released if bdf not in self.host.placement.holders()]
        if self.host.mps is not None:
            for bdf in idle:
                await self.host.mps.stop(bdf)
        release_gpus_for_handoff(self.host, ctx, idle, f"released by {ctx.run.machine_id}")


@dataclass(frozen=True)
class AttachNetwork:
    """The machine's port on the host's bridge (a VM's tap; a sandbox machine's veth into its
    own network namespace), and the ruleset that lets it talk to its org."""

    host: HostServices
    name: str = "attach_network"

    async def should_run(self, ctx: StepContext) -> bool:
        network = self.host.network
        if network is None:
            return False
        return not await network.attached(ctx.machine())

    async def run(self, ctx: StepContext) -> None:
        assert self.host.network is not None
        await self.host.network.attach(ctx.machine())


@dataclass(frozen=True)
class DetachNetwork:
    """No port (nor namespace) for the machine, and a ruleset without it.
    ``keep_if_restarting``: an exit whose restart policy boots the machine again keeps its
    port; ``unless_vm_recorded``: kept while a VM handle is recorded."""

    host: HostServices
    keep_if_restarting: bool = False
    unless_vm_recorded: bool = False
    name: str = "detach_network"

    async def should_run(self, ctx: StepContext) -> bool:
        if self.keep_if_restarting and ctx.run.progress.restart_decision == "restart":
            return False
        if self.unless_vm_recorded and ctx.runs.get_vm_handle(ctx.run.machine_id) is not None:
            return False
        network = self.host.network
        return network is not None and await network.has_port(ctx.run.machine_id)

    async def run(self, ctx: StepContext) -> None:
        assert self.host.network is not None
        await self.host.network.detach(ctx.run.machine_id)


@dataclass(frozen=True)
class PrepareRootDisk:
    """A VM's writable root disk for this boot, from the cached image."""

    platform: GuestPlatform
    run_dir: Path
    name: str = "prepare_root_disk"

    async def should_run(self, ctx: StepContext) -> bool:
        if ctx.machine().tier is not Tier.VM:
            return False
        return not (self.run_dir / RunDir.ROOT_DISK).exists()

    async def run(self, ctx: StepContext) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.platform.prepare_root_disk(
            ctx.machine().image_ref, self.run_dir / RunDir.ROOT_DISK
        )


@dataclass(frozen=True)
class PrepareRootTree:
    """A sandbox-tier machine's root folder for this boot, from the same cached image."""

    platform: GuestPlatform
    run_dir: Path
    name: str = "prepare_root_tree"

    async def should_run(self, ctx: StepContext) -> bool:
        if ctx.machine().tier is not Tier.SANDBOX:
            return False
        return not rootfs_dir(self.run_dir).exists()

    async def run(self, ctx: StepContext) -> None:
        rootfs = rootfs_dir(self.run_dir)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        await self.platform.prepare_root_tree(ctx.machine().image_ref, rootfs)


@dataclass(frozen=True)
class PrepareInitrd:
    """The boot's initrd: the machine's process, environment and files, with its app's
    secrets (as environment unless ``skip_secrets``, and the files that name one) and, when
    it mounts volumes, the volume tools and the mounts init makes (this host's volumes)."""

    host: HostServices
    run_dir: Path
    name: str = "prepare_initrd"

    async def should_run(self, ctx: StepContext) -> bool:
        if ctx.machine().tier is not Tier.VM:
            return False
        return not (self.run_dir / RunDir.INITRD).exists()

    async def run(self, ctx: StepContext) -> None:
        machine = ctx.machine()
        secrets = (
            boot_secrets(self.host.secrets, machine)
            if self.host.secrets is not None
            else BootSecrets()
        )
        mounts = []
        if machine.config.mounts:
            mounts = host_volumes(self.host).guest_mounts(machine)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.host.platform.prepare_initrd(
            machine, machine.image_ref, self.run_dir / RunDir.INITRD, secrets, mounts
        )


def sandbox_binds(host: HostServices, machine: Machine) -> list[ContainerMount]:
    """A sandbox machine's volumes, mounted on this host by ``mount_volumes``, as binds of
    its container; none for a VM or a machine without mounts."""
    if machine.tier is not Tier.SANDBOX or not machine.config.mounts:
        return []
    return host_volumes(host).container_mounts(machine)


@contextlib.asynccontextmanager
async def boot_volumes(host: HostServices, machine: Machine) -> AsyncIterator[list[VolumeDiskSpec]]:
    """A VM's volumes as disks of its launch, each volume's lock held until the VMM is
    recorded (see ``hangar.agent.volumes``); none for a machine without mounts, or a
    sandbox machine (the host mounts its volumes)."""
    if not machine.config.mounts or machine.tier is Tier.SANDBOX:
        yield []
        return
    async with host_volumes(host).boot_disks(machine) as disks:
        yield disks


async def live_handle(platform: GuestPlatform, ctx: StepContext) -> dict[str, Any] | None:
    handle = ctx.runs.get_vm_handle(ctx.run.machine_id)
    if handle is not None and await platform.alive(handle):
        return handle
    return None


def kill_unrecorded_vmms(host: HostServices, ctx: StepContext) -> None:
    """Kill VMM processes of this machine that no handle records (a launch cut short by a crash)."""
    handle = ctx.runs.get_vm_handle(ctx.run.machine_id)
    recorded_pid = handle.get("pid") if handle else None
    for pid, machine_id in host.platform.vmm_processes(host.machines_dir).items():
        if machine_id == ctx.run.machine_id and pid != recorded_pid:
            host.platform.kill_process(pid)


def boot_files_exist(run_dir: Path) -> bool:
    """Whether a boot left its root disk, initrd or sandbox bundle in ``run_dir``."""
    return any((run_dir / name).exists() for name in (*RunDir.BOOT_FILES, *RunDir.BOOT_FOLDERS))


def unlink_boot_files(run_dir: Path) -> None:
    """Drop the boot's root disk and initrd (or a sandbox machine's bundle folder): the next
    boot builds them afresh from the image."""
    for name in RunDir.BOOT_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RunDir.BOOT_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


async def forget_stale_vm(host: HostServices, ctx: StepContext) -> None:
    """Before a VMM is started: none of this machine's may run (a launch cut short by a crash,
    or a recorded one that no longer answers)."""
    kill_unrecorded_vmms(host, ctx)
    stale = ctx.runs.get_vm_handle(ctx.run.machine_id)
    if stale is not None:
        await host.platform.kill(stale)
        ctx.runs.delete_vm_handle(ctx.run.machine_id)


async def guest_network(host: HostServices, ctx: StepContext) -> GuestNetwork | None:
    if host.network is None:
        return None
    return await host.network.guest_network(ctx.machine())


@dataclass(frozen=True)
class ResumeVm:
    """Start a suspended machine from its snapshot: QEMU restores the saved guest, which runs
    on where it was (its processes, memory and uptime) on the root disk it left, with its
    volumes (kept attached while it was suspended) as the same disks. A snapshot
    that cannot be restored is dropped, with an event saying why, and the boot files go, so
    the steps after this boot the machine cold. Whether a restore was begun is recorded before
    QEMU starts: after a crash that left no snapshot, the guest may have run on from its disk,
    so that disk is dropped too."""

    host: HostServices
    name: str = "resume_vm"

    async def should_run(self, ctx: StepContext) -> bool:
        if await live_handle(self.host.platform, ctx) is not None:
            return False
        return ctx.run.progress.resume_attempted or has_snapshot(
            self.host.suspend_state(ctx.run.machine_id)
        )

    async def run(self, ctx: StepContext) -> None:
        machine_id = ctx.run.machine_id
        state = self.host.suspend_state(machine_id)
        run_dir = self.host.run_dir(machine_id)
        progress = ctx.run.progress
        await forget_stale_vm(self.host, ctx)
        if not has_snapshot(state):
            drop_snapshot(state)
            unlink_boot_files(run_dir)
            progress.resume_attempted = False
            ctx.record_event(
                "resume",
                "cold_boot",
                reason="a restore was cut short and its snapshot is gone: the machine boots "
                "afresh from its image",
            )
            return
        progress.resume_attempted = True
        ctx.runs.save_run(ctx.run)
        machine = ctx.machine()
        network = await guest_network(self.host, ctx)
        async with boot_volumes(self.host, machine) as volumes:
            try:
                handle = await self.host.platform.resume(
                    machine, run_dir, network, state, volumes, sandbox_binds(self.host, machine)
                )
            except SnapshotUnusable as error:
                unlink_boot_files(run_dir)
                progress.resume_attempted = False
                ctx.record_event(
                    "resume",
                    "cold_boot",
                    reason=f"the suspend snapshot could not be restored ({error.reason}): {error}",
                )
                return
            ctx.runs.put_vm_handle(machine_id, handle)
        progress.exit_recorded = False
        ctx.record_event("resume", "resumed")


@dataclass(frozen=True)
class LaunchVm:
    host: HostServices
    name: str = "launch_vm"

    async def should_run(self, ctx: StepContext) -> bool:
        return await live_handle(self.host.platform, ctx) is None

    async def run(self, ctx: StepContext) -> None:
        await forget_stale_vm(self.host, ctx)
        run_dir = self.host.run_dir(ctx.run.machine_id)
        (run_dir / RunDir.CONTROL_LOG).unlink(missing_ok=True)
        machine = ctx.machine()
        if machine.tier is Tier.SANDBOX:
            gpu_part = await sandbox_gpu(self.host, ctx.run.machine_id)
            network = await guest_network(self.host, ctx)
            handle = await self.host.platform.launch(
                machine,
                run_dir,
                None,
                network,
                gpu_part=gpu_part,
                volume_binds=sandbox_binds(self.host, machine),
            )
            ctx.runs.put_vm_handle(ctx.run.machine_id, handle)
            ctx.run.progress.exit_recorded = False
            return
        gpus = await gpu_boot(self.host, ctx)
        network = await guest_network(self.host, ctx)
        async with boot_volumes(self.host, machine) as volumes:
            handle = await self.host.platform.launch(machine, run_dir, gpus, network, volumes)
            ctx.runs.put_vm_handle(ctx.run.machine_id, handle)
        ctx.run.progress.exit_recorded = False


@dataclass(frozen=True)
class SuspendVm:
    """Save the guest into the machine's snapshot (QMP migration to a file) and end its VMM;
    the root disk and initrd stay exactly as the guest left them. A failure that leaves the
    guest running is retried, then rolls back to ``started``; one that ended QEMU rolls back
    to ``started`` as well, where the guest monitor records the exit."""

    host: HostServices
    name: str = "suspend_vm"

    async def should_run(self, ctx: StepContext) -> bool:
        handle = ctx.runs.get_vm_handle(ctx.run.machine_id)
        if handle is not None and self.host.platform.running(handle):
            return True
        return not has_snapshot(self.host.suspend_state(ctx.run.machine_id))

    async def run(self, ctx: StepContext) -> None:
        handle = ctx.runs.get_vm_handle(ctx.run.machine_id)
        if handle is None:
            raise VmmError(
                f"machine {ctx.run.machine_id} has no VM to suspend",
                machine_id=ctx.run.machine_id,
            )
        await self.host.platform.suspend(handle, self.host.suspend_state(ctx.run.machine_id))


@dataclass(frozen=True)
class ForgetVm:
    """Once its snapshot is whole: no VMM for the machine (suspend ended it) and no handle.
    The boot files are kept; the snapshot was taken over them."""

    host: HostServices
    name: str = "forget_vm"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.runs.get_vm_handle(ctx.run.machine_id) is not None and has_snapshot(
            self.host.suspend_state(ctx.run.machine_id)
        )

    async def run(self, ctx: StepContext) -> None:
        handle = ctx.runs.get_vm_handle(ctx.run.machine_id)
        if handle is not None:
            await self.host.platform.kill(handle)
        kill_unrecorded_vmms(self.host, ctx)
        ctx.runs.delete_vm_handle(ctx.run.machine_id)


@dataclass(frozen=True)
class SettleSuspend:
    """A suspend's rollback ends here: ``suspended`` if its snapshot is whole and no VM is
    recorded (what failed came after the save), otherwise ``started``, without any partial
    snapshot (the guest runs on, or the guest monitor records how it ended)."""

    host: HostServices
    name: str = "settle_suspend"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machine().state == MachineState.SUSPENDING

    async def run(self, ctx: StepContext) -> None:
        state = self.host.suspend_state(ctx.run.machine_id)
        recorded = ctx.runs.get_vm_handle(ctx.run.machine_id) is not None
        if has_snapshot(state) and not recorded:
            ctx.transition(MachineState.SUSPENDED, "suspend", reason=ctx.run.error)
            return
        drop_snapshot(state)
        ctx.transition(MachineState.STARTED, "suspend", reason=ctx.run.error)


@dataclass(frozen=True)
class DropSnapshot:
    """The machine's suspend snapshot is dropped (stop, update, destroy of a suspended
    machine), manifest first, so nothing left ever looks restorable."""

    host: HostServices
    name: str = "drop_snapshot"

    async def should_run(self, ctx: StepContext) -> bool:
        files = SnapshotFiles(self.host.suspend_state(ctx.run.machine_id))
        return any(path.exists() for path in files.all())

    async def run(self, ctx: StepContext) -> None:
        if drop_snapshot(self.host.suspend_state(ctx.run.machine_id)):
            ctx.record_event("suspend", "dropped", reason=f"{ctx.run.operation} of the machine")


@dataclass(frozen=True)
class StopIfSuspended:
    """A suspended machine whose snapshot was dropped is ``stopped``."""

    host: HostServices
    name: str = "stop_if_suspended"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machine().state == MachineState.SUSPENDED and not has_snapshot(
            self.host.suspend_state(ctx.run.machine_id)
        )

    async def run(self, ctx: StepContext) -> None:
        ctx.transition(MachineState.STOPPED, "stop")


@dataclass(frozen=True)
class StopVm:
    """Ask the guest to stop (``signum``, then QMP quit, then SIGKILL after ``timeout_s``);
    what the request leaves out comes from the machine's ``stop_config``."""

    platform: GuestPlatform
    timeout_s: float | None = None
    signum: int | None = None
    name: str = "stop_vm"

    async def should_run(self, ctx: StepContext) -> bool:
        return await live_handle(self.platform, ctx) is not None

    async def run(self, ctx: StepContext) -> None:
        handle = await live_handle(self.platform, ctx)
        if handle is None:
            return
        config = ctx.machine().config.stop_config
        timeout_s = config.timeout_seconds if self.timeout_s is None else self.timeout_s
        signum = config.signal_number if self.signum is None else self.signum
        await self.platform.stop(handle, timeout_s, signum)


@dataclass(frozen=True)
class RecordExit:
    """Record how the guest ended, once per boot (why it said nothing, when it did not).
    ``requested``: a stop someone asked for."""

    platform: GuestPlatform
    requested: bool
    name: str = "record_exit"

    async def should_run(self, ctx: StepContext) -> bool:
        if ctx.run.progress.exit_recorded:
            return False
        return ctx.runs.get_vm_handle(ctx.run.machine_id) is not None

    async def run(self, ctx: StepContext) -> None:
        handle = ctx.runs.get_vm_handle(ctx.run.machine_id)
        assert handle is not None, "should_run saw it"
        outcome = await self.platform.guest_exit(handle)
        exit_event: dict[str, Any] = {
            "exit_code": outcome.exit_code if outcome.exit_code is not None else -1,
            "guest_exit_code": outcome.exit_code if outcome.exit_code is not None else -1,
            "guest_signal": 0,
            "oom_killed": False,
            "requested_stop": self.requested,
            "restarting": False,
            "signal": 0,
            "exited_at": rfc3339(ctx.clock.now()),
        }
        if outcome.guest_error:
            exit_event["guest_error"] = outcome.guest_error
        restarts = sum(
            1 for e in ctx.machines.list_events(ctx.run.machine_id) if e.type == "restart"
        )
        ctx.record_event(
            "exit",
            "stopped",
            request={"exit_event": exit_event, "restart_count": restarts},
            reason=outcome.guest_error,
        )
        ctx.run.progress.exit_code = outcome.exit_code
        ctx.run.progress.exit_recorded = True


@dataclass(frozen=True)
class ReleaseVm:
    """Make sure no VMM runs for this machine, then free its per-boot files and handle. The
    boot files stay while a whole suspend snapshot does (it was taken over them): dropping
    the snapshot is :class:`DropSnapshot`'s."""

    host: HostServices
    name: str = "release_vm"

    def _boot_files_to_drop(self, machine_id: str) -> bool:
        run_dir = self.host.run_dir(machine_id)
        return boot_files_exist(run_dir) and not has_snapshot(self.host.suspend_state(machine_id))

    async def should_run(self, ctx: StepContext) -> bool:
        if ctx.runs.get_vm_handle(ctx.run.machine_id) is not None:
            return True
        return self._boot_files_to_drop(ctx.run.machine_id)

    async def run(self, ctx: StepContext) -> None:
        handle = ctx.runs.get_vm_handle(ctx.run.machine_id)
        if handle is not None:
            await self.host.platform.kill(handle)
        kill_unrecorded_vmms(self.host, ctx)
        if self._boot_files_to_drop(ctx.run.machine_id):
            unlink_boot_files(self.host.run_dir(ctx.run.machine_id))
        ctx.runs.delete_vm_handle(ctx.run.machine_id)


@dataclass(frozen=True)
class RemoveRunDir:
    run_dir: Path
    name: str = "remove_run_dir"

    async def should_run(self, ctx: StepContext) -> bool:
        return self.run_dir.exists()

    async def run(self, ctx: StepContext) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


@dataclass(frozen=True)
class DropLease:
    name: str = "drop_lease"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machines.get_lease(ctx.run.machine_id) is not None

    async def run(self, ctx: StepContext) -> None:
        ctx.machines.delete_lease(ctx.run.machine_id)


@dataclass(frozen=True)
class ApplyConfig:
    """Make ``config`` the machine's version ``version`` with a new ``instance_id`` (the old
    version is kept as replaced), in one store transaction: the version that ``should_run``
    looks at and the instance id can never disagree. Metadata keys set or removed through the
    metadata endpoints since the update was asked for (``metadata_before`` is what the
    machine had then) stay as they were set: the later write wins."""

    config: MachineConfig
    version: int
    instance_id: str
    metadata_before: dict[str, str] | None = None
    name: str = "apply_config"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machine().version < self.version

    async def run(self, ctx: StepContext) -> None:
        ctx.machines.apply_config_version(
            ctx.run.machine_id,
            self.config,
            self.version,
            self.instance_id,
            ctx.clock.now(),
            metadata_before=self.metadata_before,
        )
        ctx.record_event("update", "updated", reason=f"version {self.version}")
        ctx.notify()


@dataclass(frozen=True)
class MarkFailed:
    """Rollback's last step: the machine ends failed, with the reason the run recorded; or,
    when ``snapshot`` is whole (a suspended machine whose start failed before its restore),
    suspended still, with that reason."""

    snapshot: Path | None = None
    name: str = "mark_failed"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machine().state not in (
            MachineState.FAILED,
            MachineState.LAUNCH_FAILED,
            MachineState.SUSPENDED,
        )

    async def run(self, ctx: StepContext) -> None:
        reason = ctx.run.error or "operation failed"
        if self.snapshot is not None and has_snapshot(self.snapshot):
            ctx.transition(MachineState.SUSPENDED, ctx.run.operation, reason=reason)
            return
        state = (
            MachineState.LAUNCH_FAILED
            if reason.startswith(LaunchVm.name + ":")
            else MachineState.FAILED
        )
        ctx.transition(
            state, "launch" if ctx.run.operation == "create" else ctx.run.operation, reason=reason
        )


@dataclass(frozen=True)
class MarkStoppedAfterFailure:
    name: str = "mark_stopped"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machine().state != MachineState.STOPPED

    async def run(self, ctx: StepContext) -> None:
        ctx.transition(MachineState.STOPPED, "stop", reason=ctx.run.error)


@dataclass(frozen=True)
class ApplyRestartPolicy:
    """After a guest exits on its own: restart it, destroy it, or leave it stopped."""

    name: str = "apply_restart_policy"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.run.progress.restart_decision is None

    async def run(self, ctx: StepContext) -> None:
        machine = ctx.machine()
        policy = machine.config.restart
        exit_code = ctx.run.progress.exit_code
        now = ctx.clock.now()
        recent_restarts = [
            event
            for event in ctx.machines.list_events(machine.id)
            if event.type == "restart" and event.timestamp >= (now - RESTART_WINDOW_S) * 1000
        ]
        restart = policy.policy == "always" or (
            policy.policy == "on-failure"
            and exit_code != 0
            and len(recent_restarts) < policy.effective_max_retries
        )
        if restart:
            ctx.run.progress.restart_decision = "restart"
            ctx.record_event(
                "restart",
                "starting",
                reason=f"restart policy {policy.policy}, exit code {exit_code}",
            )
            ctx.submit(new_run(machine.id, StartRequest(), now, run_id=f"{ctx.run.id}.restart"))
        elif machine.config.auto_destroy:
            ctx.run.progress.restart_decision = "destroy"
            ctx.submit(
                new_run(machine.id, DestroyRequest(force=True), now, run_id=f"{ctx.run.id}.destroy")
            )
        else:
            ctx.run.progress.restart_decision = "stay_stopped"
