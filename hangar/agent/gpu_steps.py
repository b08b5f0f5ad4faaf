"""GPU steps: claim and bind before boot, release after the VMM is gone, and the handoff run
that makes a released GPU clean (reset, verified, back on its host driver) before it is free.

A handoff run's subject is ``gpu:BDF``; its params carry ``bdf``. A GPU is ``cleaning`` from
release until the handoff's last step, so a crash mid-handoff never frees a dirty GPU.
"""

from __future__ import annotations

from collections.abc import Callable

from hangar.agent.context import StepContext
from hangar.agent.gpus import HostGpus, choose_gpus
from hangar.agent.steps import new_run
from hangar.clock import Clock
from hangar.devices import GroupBinding
from hangar.errors import DeviceError, InsufficientCapacity
from hangar.model.gpu import GpuEvent, GpuRecord, GpuState
from hangar.store.protocol import ClusterStore, RunRecord

HANDOFF_SUBJECT_PREFIX = "gpu:"


def handoff_subject(bdf: str) -> str:
    return f"{HANDOFF_SUBJECT_PREFIX}{bdf}"


def _host_gpus(ctx: StepContext) -> HostGpus:
    if ctx.gpus is None:
        raise DeviceError("this host has no GPU support configured")
    return ctx.gpus


def held_gpus(ctx: StepContext) -> list[GpuRecord]:
    return [
        gpu
        for gpu in ctx.store.list_gpus(machine_id=ctx.run.machine_id)
        if gpu.state == GpuState.CLAIMED
    ]


def record_gpu_event(ctx: StepContext, bdf: str, action: str, **detail: object) -> None:
    ctx.store.add_gpu_event(
        GpuEvent(
            bdf=bdf,
            timestamp=ctx.clock.now(),
            action=action,
            actor="agent",
            detail={"run_id": ctx.run.id, **detail},
        )
    )


class ClaimGpus:
    name = "claim_gpus"

    async def should_run(self, ctx: StepContext) -> bool:
        wanted = ctx.machine().config.guest.gpus or 0
        return wanted > 0 and len(held_gpus(ctx)) < wanted

    async def run(self, ctx: StepContext) -> None:
        guest = ctx.machine().config.guest
        count, kind = guest.gpus or 0, guest.gpu_kind or ""
        host = _host_gpus(ctx)
        claimed = ctx.store.claim_gpus(
            host.host_id, ctx.run.machine_id, kind, count, choose_gpus, ctx.clock.now()
        )
        if claimed is None:
            raise InsufficientCapacity(
                f"insufficient capacity: no {count} free {kind} GPU(s) on host {host.host_id}",
                field="config.guest.gpu_kind",
                kind=kind,
            )
        for gpu in claimed:
            record_gpu_event(ctx, gpu.bdf, "claimed", machine_id=ctx.run.machine_id)


class BindGpus:
    """Every function of each claimed GPU's IOMMU group to vfio-pci (the binding is stored)."""

    name = "bind_gpus"

    async def should_run(self, ctx: StepContext) -> bool:
        held = held_gpus(ctx)
        if not held:
            return False
        return any(gpu.binding is None for gpu in held) or not _host_gpus(ctx).on_vfio(
            [gpu.bdf for gpu in held]
        )

    async def run(self, ctx: StepContext) -> None:
        host = _host_gpus(ctx)
        for gpu in held_gpus(ctx):
            previous = GroupBinding.model_validate(gpu.binding) if gpu.binding else None
            binding = host.bind(gpu.bdf, previous)
            updated = gpu.model_copy(
                update={"binding": binding.model_dump(mode="json"), "updated_at": ctx.clock.now()}
            )
            ctx.store.update_gpu(updated, expected_state=GpuState.CLAIMED)


class ReleaseGpus:
    """After the VMM is gone: each held GPU goes to ``cleaning`` and gets a handoff run."""

    name = "release_gpus"

    async def should_run(self, ctx: StepContext) -> bool:
        return bool(held_gpus(ctx))

    async def run(self, ctx: StepContext) -> None:
        for gpu in held_gpus(ctx):
            release_for_handoff(ctx, gpu, f"released by machine {ctx.run.machine_id}")


def release_for_handoff(ctx: StepContext, gpu: GpuRecord, why: str) -> None:
    start_handoff(ctx.store, ctx.clock, ctx.submit, gpu, why, f"handoff.{gpu.bdf}.{ctx.run.id}")


def start_handoff(
    store: ClusterStore,
    clock: Clock,
    submit: Callable[[RunRecord], bool],
    gpu: GpuRecord,
    why: str,
    run_id: str | None = None,
) -> None:
    """The GPU leaves its holder for ``cleaning`` (never straight to free) and gets a
    handoff run; a given ``run_id`` makes a repeated call submit nothing new."""
    cleaning = gpu.model_copy(
        update={
            "state": GpuState.CLEANING,
            "machine_id": "",
            "reason": why,
            "updated_at": clock.now(),
        }
    )
    if store.update_gpu(cleaning, expected_state=gpu.state):
        store.add_gpu_event(
            GpuEvent(
                bdf=gpu.bdf,
                timestamp=clock.now(),
                action="cleaning",
                actor="agent",
                detail={"why": why},
            )
        )
    submit(
        new_run(handoff_subject(gpu.bdf), "handoff", clock.now(), {"bdf": gpu.bdf}, run_id=run_id)
    )


def _gpu(ctx: StepContext) -> GpuRecord:
    bdf = str(ctx.run.params["bdf"])
    gpu = ctx.store.get_gpu(bdf)
    if gpu is None:
        raise DeviceError(f"GPU {bdf} is not in the store", bdf=bdf)
    return gpu


class ResetGpu:
    name = "reset_gpu"

    async def should_run(self, ctx: StepContext) -> bool:
        return _gpu(ctx).state == GpuState.CLEANING and not ctx.run.data.get("reset_ok")

    async def run(self, ctx: StepContext) -> None:
        gpu = _gpu(ctx)
        binding = GroupBinding.model_validate(gpu.binding) if gpu.binding else None
        outcome = _host_gpus(ctx).reset(gpu.bdf, binding)
        record_gpu_event(ctx, gpu.bdf, "reset", ok=outcome.ok, reason=outcome.reason or "")
        if not outcome.ok:
            raise DeviceError(f"reset of GPU {gpu.bdf} failed: {outcome.reason}", bdf=gpu.bdf)
        ctx.run.data["reset_ok"] = True


class RestoreHostDrivers:
    name = "restore_host_drivers"

    async def should_run(self, ctx: StepContext) -> bool:
        gpu = _gpu(ctx)
        return gpu.state == GpuState.CLEANING and gpu.binding is not None

    async def run(self, ctx: StepContext) -> None:
        gpu = _gpu(ctx)
        assert gpu.binding is not None
        _host_gpus(ctx).restore_host_drivers(GroupBinding.model_validate(gpu.binding))
        ctx.store.update_gpu(
            gpu.model_copy(update={"binding": None}), expected_state=GpuState.CLEANING
        )
        record_gpu_event(ctx, gpu.bdf, "host_drivers_restored")


class ReturnGpu:
    name = "return_gpu"

    async def should_run(self, ctx: StepContext) -> bool:
        return _gpu(ctx).state == GpuState.CLEANING

    async def run(self, ctx: StepContext) -> None:
        gpu = _gpu(ctx)
        free = gpu.model_copy(
            update={"state": GpuState.FREE, "reason": "", "updated_at": ctx.clock.now()}
        )
        if ctx.store.update_gpu(free, expected_state=GpuState.CLEANING):
            record_gpu_event(ctx, gpu.bdf, "free")


class QuarantineGpu:
    """A handoff that fails keeps the GPU out of the pool until an operator releases it."""

    name = "quarantine_gpu"

    async def should_run(self, ctx: StepContext) -> bool:
        return _gpu(ctx).state != GpuState.QUARANTINED

    async def run(self, ctx: StepContext) -> None:
        gpu = _gpu(ctx)
        reason = ctx.run.error or "handoff failed"
        quarantined = gpu.model_copy(
            update={
                "state": GpuState.QUARANTINED,
                "machine_id": "",
                "reason": reason,
                "updated_at": ctx.clock.now(),
            }
        )
        ctx.store.update_gpu(quarantined)
        record_gpu_event(ctx, gpu.bdf, "quarantined", reason=reason)
