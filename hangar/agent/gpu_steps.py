"""GPU steps: bind a machine's claimed GPUs before boot, and the handoff run that makes a
released GPU clean (reset, verified, back on its host driver) before it is free.

Claims are the scheduler's (``HostPlacement``): a GPU released by its machine is ``cleaning``
in the host's claim record from that instant, so a crash mid-handoff never frees a dirty GPU.
A handoff run's subject is ``gpu:BDF``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hangar.agent.gpus import HostGpus
from hangar.clock import Clock
from hangar.devices import GroupBinding
from hangar.errors import DeviceError
from hangar.model.gpu import GpuEvent, GpuRecord, GpuState
from hangar.model.machine import new_ulid
from hangar.model.run import HandoffRequest, RunRecord, RunStatus

if TYPE_CHECKING:
    from hangar.agent.context import StepContext
    from hangar.agent.host import HostServices
    from hangar.store.protocol import GpuStore

HANDOFF_SUBJECT_PREFIX = "gpu:"


def handoff_subject(bdf: str) -> str:
    return f"{HANDOFF_SUBJECT_PREFIX}{bdf}"


def _host_gpus(host: HostServices) -> HostGpus:
    if host.gpus is None:
        raise DeviceError("this host has no GPU support configured")
    return host.gpus


def gpu_event(store: GpuStore, clock: Clock, bdf: str, action: str, **detail: object) -> None:
    store.add_gpu_event(
        GpuEvent(bdf=bdf, timestamp=clock.now(), action=action, actor="agent", detail=detail)
    )


def _record(host: HostServices, bdf: str, ctx: StepContext) -> GpuRecord:
    record = host.gpu_store.get_gpu(bdf)
    if record is None:
        raise DeviceError(f"GPU {bdf} is not in the store", bdf=bdf)
    return record


def handoff_run(bdf: str, now: float, run_id: str | None = None) -> RunRecord:
    return RunRecord(
        id=run_id or new_ulid(now),
        machine_id=handoff_subject(bdf),
        request=HandoffRequest(bdf=bdf),
        status=RunStatus.RUNNING,
        created_at=now,
        updated_at=now,
    )


def submit_handoffs(
    gpu_store: GpuStore,
    clock: Clock,
    submit: Callable[[RunRecord], bool],
    bdfs: Sequence[str],
    why: str,
    run_id_prefix: str | None = None,
) -> None:
    """A handoff run for each GPU (already ``cleaning`` in the claim record); with
    ``run_id_prefix`` a repeated call submits nothing new."""
    for bdf in bdfs:
        run_id = f"handoff.{bdf}.{run_id_prefix}" if run_id_prefix else None
        if submit(handoff_run(bdf, clock.now(), run_id)):
            gpu_event(gpu_store, clock, bdf, "cleaning", why=why)


def release_gpus_for_handoff(
    host: HostServices, ctx: StepContext, bdfs: Sequence[str], why: str
) -> None:
    submit_handoffs(host.gpu_store, ctx.clock, ctx.submit, bdfs, why, ctx.run.id)


@dataclass(frozen=True)
class BindGpus:
    """Every function of each claimed GPU's IOMMU group to vfio-pci (the binding is stored)."""

    host: HostServices
    name: str = "bind_gpus"

    async def should_run(self, ctx: StepContext) -> bool:
        bdfs = self.host.placement.claimed_bdfs(ctx.run.machine_id)
        if not bdfs:
            return False
        records = [_record(self.host, bdf, ctx) for bdf in bdfs]
        return any(record.binding is None for record in records) or not _host_gpus(
            self.host
        ).on_vfio(bdfs)

    async def run(self, ctx: StepContext) -> None:
        devices = _host_gpus(self.host)
        for bdf in self.host.placement.claimed_bdfs(ctx.run.machine_id):
            record = _record(self.host, bdf, ctx)
            previous = GroupBinding.model_validate(record.binding) if record.binding else None
            binding = devices.bind(bdf, previous)
            self.host.gpu_store.save_gpu(
                record.model_copy(
                    update={
                        "binding": binding.model_dump(mode="json"),
                        "updated_at": ctx.clock.now(),
                    }
                )
            )


def _state(host: HostServices, bdf: str) -> GpuState:
    gpu = host.placement.gpu(bdf)
    if gpu is None:
        raise DeviceError(f"GPU {bdf} is not on this host", bdf=bdf)
    return gpu.state


@dataclass(frozen=True)
class ResetGpu:
    host: HostServices
    bdf: str
    name: str = "reset_gpu"

    async def should_run(self, ctx: StepContext) -> bool:
        return _state(self.host, self.bdf) is GpuState.CLEANING and not ctx.run.progress.reset_ok

    async def run(self, ctx: StepContext) -> None:
        record = _record(self.host, self.bdf, ctx)
        binding = GroupBinding.model_validate(record.binding) if record.binding else None
        outcome = _host_gpus(self.host).reset(self.bdf, binding)
        gpu_event(
            self.host.gpu_store,
            ctx.clock,
            self.bdf,
            "reset",
            run_id=ctx.run.id,
            ok=outcome.ok,
            reason=outcome.reason or "",
        )
        if not outcome.ok:
            raise DeviceError(f"reset of GPU {self.bdf} failed: {outcome.reason}", bdf=self.bdf)
        ctx.run.progress.reset_ok = True


@dataclass(frozen=True)
class RestoreHostDrivers:
    host: HostServices
    bdf: str
    name: str = "restore_host_drivers"

    async def should_run(self, ctx: StepContext) -> bool:
        if _state(self.host, self.bdf) is not GpuState.CLEANING:
            return False
        return _record(self.host, self.bdf, ctx).binding is not None

    async def run(self, ctx: StepContext) -> None:
        record = _record(self.host, self.bdf, ctx)
        assert record.binding is not None
        _host_gpus(self.host).restore_host_drivers(GroupBinding.model_validate(record.binding))
        self.host.gpu_store.save_gpu(record.model_copy(update={"binding": None}))
        gpu_event(
            self.host.gpu_store, ctx.clock, self.bdf, "host_drivers_restored", run_id=ctx.run.id
        )


@dataclass(frozen=True)
class ReturnGpu:
    host: HostServices
    bdf: str
    name: str = "return_gpu"

    async def should_run(self, ctx: StepContext) -> bool:
        return _state(self.host, self.bdf) is GpuState.CLEANING

    async def run(self, ctx: StepContext) -> None:
        record = _record(self.host, self.bdf, ctx)
        if record.quarantine_reason:
            self.host.gpu_store.save_gpu(record.model_copy(update={"quarantine_reason": ""}))
        if self.host.placement.set_gpu_state(self.bdf, GpuState.FREE, GpuState.CLEANING):
            gpu_event(self.host.gpu_store, ctx.clock, self.bdf, "free", run_id=ctx.run.id)


@dataclass(frozen=True)
class QuarantineGpu:
    """A handoff that fails keeps the GPU out of the pool until an operator releases it."""

    host: HostServices
    bdf: str
    name: str = "quarantine_gpu"

    async def should_run(self, ctx: StepContext) -> bool:
        return _state(self.host, self.bdf) is not GpuState.QUARANTINED

    async def run(self, ctx: StepContext) -> None:
        reason = ctx.run.error or "handoff failed"
        record = _record(self.host, self.bdf, ctx)
        self.host.gpu_store.save_gpu(
            record.model_copy(update={"quarantine_reason": reason, "updated_at": ctx.clock.now()})
        )
        self.host.placement.set_gpu_state(self.bdf, GpuState.QUARANTINED, None)
        gpu_event(
            self.host.gpu_store,
            ctx.clock,
            self.bdf,
            "quarantined",
            run_id=ctx.run.id,
            reason=reason,
        )
