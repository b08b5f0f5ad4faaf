"""The steps machine operations are made of. Each is idempotent: ``should_run`` looks at the
world (records, files, processes) and ``run`` brings it one step closer to the plan's goal."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from hangar.agent.context import StepContext
from hangar.agent.platform import RunDirLayout
from hangar.model.gpu import GpuState
from hangar.model.machine import MachineState, new_ulid
from hangar.store.protocol import RunRecord, RunStatus

RESTART_WINDOW_S = 300.0


def new_run(
    machine_id: str,
    operation: str,
    now: float,
    params: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> RunRecord:
    return RunRecord(
        id=run_id or new_ulid(now),
        machine_id=machine_id,
        operation=operation,
        status=RunStatus.RUNNING,
        params=params or {},
        created_at=now,
        updated_at=now,
    )


@dataclass(frozen=True)
class Transition:
    """Move the machine to ``state`` unless it is there already, or the run's gate is off."""

    name: str
    state: MachineState
    event_type: str
    only_if_param: str = ""

    async def should_run(self, ctx: StepContext) -> bool:
        if self.only_if_param and not ctx.run.params.get(self.only_if_param):
            return False
        return ctx.machine().state != self.state

    async def run(self, ctx: StepContext) -> None:
        request = {"exit_code": ctx.run.data["exit_code"]} if "exit_code" in ctx.run.data else {}
        ctx.transition(self.state, self.event_type, request=request)


class ResolveImage:
    name = "resolve_image"

    async def should_run(self, ctx: StepContext) -> bool:
        machine = ctx.machine()
        if ctx.run.params.get("resolve_image") and not ctx.run.data.get("image_resolved"):
            return True
        return not machine.image_ref.digest or not ctx.platform.image_cached(machine.image_ref)

    async def run(self, ctx: StepContext) -> None:
        image_ref = await ctx.platform.resolve_image(ctx.machine().config.image)
        ctx.store.set_image_ref(ctx.run.machine_id, image_ref, ctx.clock.now())
        ctx.run.data["image_resolved"] = True


class PrepareRootDisk:
    name = "prepare_root_disk"

    async def should_run(self, ctx: StepContext) -> bool:
        return not (ctx.run_dir / RunDirLayout.ROOT_DISK).exists()

    async def run(self, ctx: StepContext) -> None:
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        await ctx.platform.prepare_root_disk(
            ctx.machine().image_ref, ctx.run_dir / RunDirLayout.ROOT_DISK
        )


class PrepareInitrd:
    name = "prepare_initrd"

    async def should_run(self, ctx: StepContext) -> bool:
        return not (ctx.run_dir / RunDirLayout.INITRD).exists()

    async def run(self, ctx: StepContext) -> None:
        machine = ctx.machine()
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        await ctx.platform.prepare_initrd(
            machine, machine.image_ref, ctx.run_dir / RunDirLayout.INITRD
        )


async def live_handle(ctx: StepContext) -> dict[str, Any] | None:
    handle = ctx.store.get_vm_handle(ctx.run.machine_id)
    if handle is not None and await ctx.platform.alive(handle):
        return handle
    return None


def kill_unrecorded_vmms(ctx: StepContext) -> None:
    """Kill VMM processes of this machine that no handle records (a launch cut short by a crash)."""
    handle = ctx.store.get_vm_handle(ctx.run.machine_id)
    recorded_pid = handle.get("pid") if handle else None
    for pid, machine_id in ctx.platform.vmm_processes(ctx.machines_dir).items():
        if machine_id == ctx.run.machine_id and pid != recorded_pid:
            ctx.platform.kill_process(pid)


class LaunchVm:
    name = "launch_vm"

    async def should_run(self, ctx: StepContext) -> bool:
        return await live_handle(ctx) is None

    async def run(self, ctx: StepContext) -> None:
        kill_unrecorded_vmms(ctx)
        stale = ctx.store.get_vm_handle(ctx.run.machine_id)
        if stale is not None:
            await ctx.platform.kill(stale)
            ctx.store.delete_vm_handle(ctx.run.machine_id)
        (ctx.run_dir / RunDirLayout.CONTROL_LOG).unlink(missing_ok=True)
        gpus = [
            gpu.bdf
            for gpu in ctx.store.list_gpus(machine_id=ctx.run.machine_id)
            if gpu.state == GpuState.CLAIMED
        ]
        handle = await ctx.platform.launch(ctx.machine(), ctx.run_dir, gpus)
        ctx.store.put_vm_handle(ctx.run.machine_id, handle)
        ctx.run.data.pop("exit_recorded", None)


class StopVm:
    """Ask the guest to stop (signal, then QMP quit, then SIGKILL after the timeout)."""

    name = "stop_vm"

    async def should_run(self, ctx: StepContext) -> bool:
        return await live_handle(ctx) is not None

    async def run(self, ctx: StepContext) -> None:
        handle = await live_handle(ctx)
        if handle is None:
            return
        config = ctx.machine().config.stop_config
        timeout_s = float(ctx.run.params.get("timeout_s", config.timeout_seconds))
        signum = int(ctx.run.params.get("signal", config.signal_number))
        await ctx.platform.stop(handle, timeout_s, signum)


class RecordExit:
    """Record how the guest ended, once per boot."""

    name = "record_exit"

    async def should_run(self, ctx: StepContext) -> bool:
        if ctx.run.data.get("exit_recorded"):
            return False
        return ctx.store.get_vm_handle(ctx.run.machine_id) is not None

    async def run(self, ctx: StepContext) -> None:
        outcome = ctx.platform.guest_exit(ctx.run_dir)
        requested = ctx.run.operation != "exit"
        exit_event: dict[str, Any] = {
            "exit_code": outcome.exit_code if outcome.exit_code is not None else -1,
            "guest_exit_code": outcome.exit_code,
            "requested_stop": requested,
            "exited_at": int(ctx.clock.now() * 1000),
        }
        if outcome.guest_error:
            exit_event["guest_error"] = outcome.guest_error
        ctx.record_event("exit", "stopped", {"exit_event": exit_event})
        ctx.run.data["exit_code"] = outcome.exit_code
        ctx.run.data["exit_recorded"] = True


class ReleaseVm:
    """Make sure no VMM runs for this machine, then free its per-boot files and handle."""

    name = "release_vm"

    async def should_run(self, ctx: StepContext) -> bool:
        if ctx.store.get_vm_handle(ctx.run.machine_id) is not None:
            return True
        return any((ctx.run_dir / name).exists() for name in RunDirLayout.BOOT_FILES)

    async def run(self, ctx: StepContext) -> None:
        handle = ctx.store.get_vm_handle(ctx.run.machine_id)
        if handle is not None:
            await ctx.platform.kill(handle)
        kill_unrecorded_vmms(ctx)
        for name in RunDirLayout.BOOT_FILES:
            (ctx.run_dir / name).unlink(missing_ok=True)
        ctx.store.delete_vm_handle(ctx.run.machine_id)


class RemoveRunDir:
    name = "remove_run_dir"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.run_dir.exists()

    async def run(self, ctx: StepContext) -> None:
        shutil.rmtree(ctx.run_dir, ignore_errors=True)


class DropLease:
    name = "drop_lease"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.store.get_lease(ctx.run.machine_id) is not None

    async def run(self, ctx: StepContext) -> None:
        ctx.store.delete_lease(ctx.run.machine_id)


class ApplyConfig:
    """Make the run's config the machine's current version (the old one is kept as replaced)."""

    name = "apply_config"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machine().version < int(ctx.run.params["version"])

    async def run(self, ctx: StepContext) -> None:
        from hangar.model.config import MachineConfig

        machine = ctx.machine()
        machine.config = MachineConfig.model_validate(ctx.run.params["config"])
        machine.version = int(ctx.run.params["version"])
        machine.instance_id = str(ctx.run.params["instance_id"])
        ctx.store.save_config_version(machine, ctx.clock.now())
        machine = ctx.machine()
        machine.instance_id = str(ctx.run.params["instance_id"])
        ctx.store.save_machine(machine)
        ctx.record_event("update", "updated", {"version": machine.version})
        ctx.notify()


class MarkFailed:
    """Rollback's last step: the machine ends failed, with the reason the run recorded."""

    name = "mark_failed"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machine().state not in (MachineState.FAILED, MachineState.LAUNCH_FAILED)

    async def run(self, ctx: StepContext) -> None:
        reason = ctx.run.error or "operation failed"
        state = (
            MachineState.LAUNCH_FAILED if reason.startswith(LaunchVm.name) else MachineState.FAILED
        )
        ctx.transition(
            state, "launch" if ctx.run.operation == "create" else ctx.run.operation, reason=reason
        )


class MarkStoppedAfterFailure:
    name = "mark_stopped"

    async def should_run(self, ctx: StepContext) -> bool:
        return ctx.machine().state != MachineState.STOPPED

    async def run(self, ctx: StepContext) -> None:
        ctx.transition(MachineState.STOPPED, "stop", reason=ctx.run.error)


class ApplyRestartPolicy:
    """After a guest exits on its own: restart it, destroy it, or leave it stopped."""

    name = "apply_restart_policy"

    async def should_run(self, ctx: StepContext) -> bool:
        return "restart_decision" not in ctx.run.data

    async def run(self, ctx: StepContext) -> None:
        machine = ctx.machine()
        policy = machine.config.restart
        exit_code = ctx.run.data.get("exit_code")
        failed = exit_code != 0
        now = ctx.clock.now()
        recent_restarts = [
            event
            for event in ctx.store.list_events(machine.id)
            if event.type == "restart" and event.timestamp >= (now - RESTART_WINDOW_S) * 1000
        ]
        restart = policy.policy == "always" or (
            policy.policy == "on-failure"
            and failed
            and len(recent_restarts) < policy.effective_max_retries
        )
        if restart:
            decision = "restart"
            ctx.record_event(
                "restart", "starting", {"policy": policy.policy, "exit_code": exit_code}
            )
            ctx.submit(new_run(machine.id, "start", now, run_id=f"{ctx.run.id}.restart"))
        elif machine.config.auto_destroy:
            decision = "destroy"
            ctx.submit(
                new_run(machine.id, "destroy", now, {"force": True}, run_id=f"{ctx.run.id}.destroy")
            )
        else:
            decision = "stay_stopped"
        ctx.run.data["restart_decision"] = decision
