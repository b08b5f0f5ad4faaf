"""GPU steps: a machine's IOMMU groups from claim to boot, the Xids its guest forwards, and
the handoff run that makes a released group clean before it is free.

The claim unit is the IOMMU group (VFIO hands a whole group to one guest, and a bind or a
reset acts on all of it). Claims are the scheduler's (``HostPlacement``), which never splits
a group; each group a machine holds has a record in the GPU store
(:class:`hangar.agent.gpus.HeldGroup`). A group released by its machine is ``cleaning`` in
the host's claim record from that instant, so a crash mid-handoff never frees a dirty GPU.

Start: ``place_machine`` (the scheduler picks whole groups) -> ``claim_gpu_groups``
(usable, nothing on the host holds a GPU: retryable) -> ``bind_gpus`` (vfio-pci) ->
``prepare_nvlink`` (Fabric Manager partition, or NVLink off for a lone NVSwitch GPU) -> the
VM (``gpu_boot``: marked launched first) -> ``map_gpu_addresses`` (QMP ``query-pci``).

Handoff, one run per group (subject ``gpu:<first GPU>``), the phases of
:func:`hangar.devices.handoff.run_handoff` as durable steps: ``check_vm_released`` ->
``deactivate_fabric`` -> ``hold_group`` -> ``restage_settings`` -> ``scrub_group`` ->
``check_group_health`` -> ``restore_host_drivers`` -> ``apply_staged_settings`` ->
``verify_group`` -> ``return_group``; a group whose claim never reached launch only goes
back to its host drivers. Any DeviceError quarantines the group (``quarantine_group``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from hangar.agent.gpus import HeldGroup, HostGpus, read_held_group, write_held_group
from hangar.agent.platform import GpuBoot
from hangar.clock import Clock
from hangar.devices.fabric import nvlink_disabled_for
from hangar.devices.groups import GpuGroup
from hangar.devices.handoff import (
    GroupClaim,
    HandoffContext,
    apply_staged_settings,
    check_not_held,
    check_vm_released,
    hold_for_handoff,
    nvml_health,
    scrub_group,
    stage_settings,
    verify_handoff,
    vfio_health,
)
from hangar.devices.health import Finding
from hangar.devices.settings import BoundTo, StagedSettings
from hangar.devices.vfio import FunctionBinding, GroupBinding, bind_group_to_vfio
from hangar.devices.xid import MAX_XIDS_PER_MACHINE, xid_events
from hangar.errors import DeviceError
from hangar.images.driver_bundle import NVLINK_OFF_KERNEL_ARG
from hangar.model.gpu import GpuEvent, GpuState
from hangar.model.gpu_kinds import gpu_kind_named
from hangar.model.guest_contract import RunDir
from hangar.model.machine import new_ulid
from hangar.model.run import HandoffRequest, RunRecord, RunStatus
from hangar.vmm.control import read_control_events
from hangar.vmm.gpu_topology import gpu_device_ids, plan_gpu_topology

if TYPE_CHECKING:
    from hangar.agent.context import StepContext
    from hangar.agent.engine import Step
    from hangar.agent.host import HostServices
    from hangar.store.protocol import GpuStore

HANDOFF_SUBJECT_PREFIX = "gpu:"

T = TypeVar("T")
HandoffCase = Literal["scrub", "release", "none"]
"""What a handoff does: scrub a group a VM had; give back one whose claim never reached
launch; or nothing but free one hangar never took."""


def handoff_subject(bdf: str) -> str:
    return f"{HANDOFF_SUBJECT_PREFIX}{bdf}"


def _host_gpus(host: HostServices) -> HostGpus:
    if host.gpus is None:
        raise DeviceError("this host has no GPU support configured")
    return host.gpus


def gpu_event(
    store: GpuStore,
    now: float,
    bdf: str,
    action: str,
    iommu_group: int | None,
    detail: dict[str, Any],
    actor: str = "agent",
) -> None:
    store.add_gpu_event(
        GpuEvent(
            bdf=bdf,
            timestamp=now,
            action=action,
            actor=actor,
            detail=detail,
            iommu_group=iommu_group,
        )
    )


def _group_event(
    host: HostServices, ctx: StepContext, gpus: Sequence[str], action: str, **detail: object
) -> None:
    group = _iommu_group(host, gpus[0])
    for bdf in gpus:
        gpu_event(
            host.gpu_store, ctx.clock.now(), bdf, action, group, {"run_id": ctx.run.id, **detail}
        )


def _iommu_group(host: HostServices, bdf: str) -> int | None:
    gpu = host.placement.gpu(bdf)
    return gpu.iommu_group if gpu is not None else None


async def _device(ctx: StepContext, call: Callable[..., T], *args: Any) -> T:
    """A device call in a thread (it may block until its deadline). A DeviceError is
    recorded in the run (its ``reason``, whether a worker was killed) and raised again."""
    try:
        result = await asyncio.to_thread(call, *args)
    except DeviceError as error:
        ctx.run.progress.devices["failure"] = {
            "reason": str(error.fields.get("reason", "device_error")),
            "timed_out": bool(error.fields.get("timed_out", False)),
            "stuck": bool(error.fields.get("stuck", False)),
            "retryable": error.retryable,
        }
        raise
    ctx.run.progress.devices.pop("failure", None)
    return result


# --- the machine's groups ---------------------------------------------------------------


def held_groups(host: HostServices, machine_id: str) -> list[HeldGroup]:
    """The records of the groups ``machine_id`` holds (claimed, and recorded as its)."""
    found = []
    for gpus in host.placement.claimed_groups(machine_id):
        held = read_held_group(host.gpu_store, gpus[0])
        if held is not None and held.machine_id == machine_id:
            found.append(held)
    return found


def _update(host: HostServices, ctx: StepContext, held: HeldGroup, **changes: Any) -> None:
    """Store the group's record with ``changes``."""
    write_held_group(host.gpu_store, held.lead, held.model_copy(update=changes), ctx.clock.now())


def record_claimed(host: HostServices, ctx: StepContext) -> None:
    for gpus in host.placement.claimed_groups(ctx.run.machine_id):
        _group_event(host, ctx, gpus, "claimed", machine_id=ctx.run.machine_id)


@dataclass(frozen=True)
class ClaimGpuGroups:
    """Check each claimed group can go to a tenant now (usable; nothing on the host holds a
    GPU of it, which would hang the nvidia driver's unbind: retryable) and record it with
    its AER baseline."""

    host: HostServices
    name: str = "claim_gpu_groups"

    async def should_run(self, ctx: StepContext) -> bool:
        claimed = self.host.placement.claimed_groups(ctx.run.machine_id)
        return len(held_groups(self.host, ctx.run.machine_id)) < len(claimed)

    async def run(self, ctx: StepContext) -> None:
        devices = _host_gpus(self.host)
        for gpus in self.host.placement.claimed_groups(ctx.run.machine_id):
            held = read_held_group(self.host.gpu_store, gpus[0])
            if held is not None and held.machine_id == ctx.run.machine_id:
                continue
            number = _iommu_group(self.host, gpus[0])
            if number is None:
                raise DeviceError(f"GPU {gpus[0]} has no IOMMU group", bdf=gpus[0])
            claim = await _device(ctx, devices.begin, number)
            if claim.gpus != gpus:
                raise DeviceError(
                    f"IOMMU group {number} holds {claim.gpus} on the host, the claim {gpus}",
                    reason="group_mismatch",
                    iommu_group=number,
                )
            write_held_group(
                self.host.gpu_store,
                gpus[0],
                HeldGroup(machine_id=ctx.run.machine_id, claim=claim),
                ctx.clock.now(),
            )


@dataclass(frozen=True)
class BindGpus:
    """Every function of each claimed group to vfio-pci (the binding is recorded; a bind cut
    short records what it moved, so the release knows the original drivers)."""

    host: HostServices
    name: str = "bind_gpus"

    async def should_run(self, ctx: StepContext) -> bool:
        devices = self.host.gpus
        return any(
            held.claim.binding is None
            or devices is None
            or not devices.on_vfio(held.claim.functions)
            for held in held_groups(self.host, ctx.run.machine_id)
        )

    async def run(self, ctx: StepContext) -> None:
        devices = _host_gpus(self.host)
        for held in held_groups(self.host, ctx.run.machine_id):
            if held.claim.binding is not None and devices.on_vfio(held.claim.functions):
                continue
            try:
                claim = await _device(ctx, devices.bind, held.claim)
            except DeviceError as error:
                partial = error.fields.get("binding")
                if isinstance(partial, dict):
                    binding = GroupBinding.model_validate(partial)
                    partly = held.claim.model_copy(update={"binding": binding})
                    _update(self.host, ctx, held, claim=partly)
                raise
            _update(self.host, ctx, held, claim=claim)
            _group_event(self.host, ctx, held.claim.gpus, "bound", driver="vfio-pci")


@dataclass(frozen=True)
class PrepareNvlink:
    """NVSwitch GPUs: a lone one boots with NVLink off in its guest driver; several get the
    Fabric Manager partition made of exactly them (the scheduler placed by partition),
    recorded before it is activated so that a crash in between still deactivates it."""

    host: HostServices
    name: str = "prepare_nvlink"

    async def should_run(self, ctx: StepContext) -> bool:
        held = held_groups(self.host, ctx.run.machine_id)
        if not held:
            return False
        kind = gpu_kind_named(self._kind(held))
        return kind is not None and kind.nvlink == "baseboard"

    def _kind(self, held: Sequence[HeldGroup]) -> str:
        record = self.host.gpu_store.get_gpu(held[0].lead)
        return record.kind if record is not None else ""

    async def run(self, ctx: StepContext) -> None:
        held = held_groups(self.host, ctx.run.machine_id)
        kind = gpu_kind_named(self._kind(held))
        assert kind is not None
        gpus = [bdf for group in held for bdf in group.claim.gpus]
        if nvlink_disabled_for(kind, len(gpus)):
            for group in held:
                claim = group.claim.model_copy(update={"nvlink_disabled": True})
                _update(self.host, ctx, group, claim=claim)
            return
        partition = held[0].claim.fabric_partition
        if partition is None:
            partition = self.host.placement.partition_of(gpus)
        if partition is None:
            raise DeviceError(
                f"no Fabric Manager partition is made of exactly {gpus}",
                reason="fabric_mismatch",
            )
        for group in held:
            claim = group.claim.model_copy(update={"fabric_partition": partition})
            _update(self.host, ctx, group, claim=claim)
        modules = []
        for bdf in gpus:
            record = self.host.gpu_store.get_gpu(bdf)
            if record is None or record.module_id is None:
                raise DeviceError(f"GPU {bdf} reports no module id", reason="fabric_mismatch")
            modules.append(record.module_id)
        await _device(ctx, _host_gpus(self.host).activate_partition, partition, modules)
        for group in held:
            _group_event(self.host, ctx, group.claim.gpus, "fabric_activated", partition=partition)


async def gpu_boot(host: HostServices, ctx: StepContext) -> GpuBoot | None:
    """What the machine's VM gets of its GPUs; None for a machine without. Its groups are
    recorded as launched first (a handoff then scrubs them, whatever happens next). Memory
    off 1 GiB pages is an event of the machine, never silent."""
    held = held_groups(host, ctx.run.machine_id)
    if not held:
        return None
    devices = _host_gpus(host)
    for group in held:
        _update(host, ctx, group, launched=True, device_ids={}, guest_addresses={})
    groups = [devices.group(group.claim.iommu_group) for group in held]
    passthrough = await asyncio.to_thread(devices.passthrough, groups)
    guest = ctx.machine().config.guest
    memory = await asyncio.to_thread(
        devices.memory_plan, guest.memory_mb, guest.cpus, [gpu.numa_node for gpu in passthrough]
    )
    if memory.fallback:
        ctx.record_event(
            "gpu_memory", "fallback", reason=f"{memory.page_size} pages: {memory.fallback}"
        )
    topology = plan_gpu_topology(passthrough, memory, await asyncio.to_thread(devices.phys_bits))
    ids = gpu_device_ids(topology)
    for group in held_groups(host, ctx.run.machine_id):
        mine = {device: bdf for device, bdf in ids.items() if bdf in group.claim.functions}
        _update(host, ctx, group, device_ids=mine)
    nvlink_off = any(group.claim.nvlink_disabled for group in held)
    return GpuBoot(topology=topology, kernel_args=[NVLINK_OFF_KERNEL_ARG] if nvlink_off else [])


@dataclass(frozen=True)
class MapGpuAddresses:
    """Where the guest sees each GPU (QMP ``query-pci`` once its firmware placed them), so
    the Xid lines it forwards are charged to the right host GPU."""

    host: HostServices
    name: str = "map_gpu_addresses"

    async def should_run(self, ctx: StepContext) -> bool:
        held = held_groups(self.host, ctx.run.machine_id)
        return any(group.launched and not group.guest_addresses for group in held)

    async def run(self, ctx: StepContext) -> None:
        handle = ctx.runs.get_vm_handle(ctx.run.machine_id)
        held = held_groups(self.host, ctx.run.machine_id)
        if handle is None or not held:
            return
        ids = {device: bdf for group in held for device, bdf in group.device_ids.items()}
        addresses = await self.host.platform.gpu_addresses(handle, ids)
        missing = sorted(set(ids.values()) - set(addresses.values()))
        if missing:
            ctx.record_event(
                "gpu_addresses",
                "incomplete",
                reason=f"{', '.join(missing)} not placed by the guest's firmware: "
                "Xids at unknown addresses count for every GPU",
            )
        for group in held:
            mine = {a: b for a, b in addresses.items() if b in group.claim.functions}
            _update(self.host, ctx, group, guest_addresses=mine)


@dataclass(frozen=True)
class CollectGpuXids:
    """The Xid lines the guest forwarded, each a GPU event and kept with its group for the
    handoff (one at no known address counts for every GPU of the machine)."""

    host: HostServices
    run_dir: Path
    name: str = "collect_gpu_xids"

    async def should_run(self, ctx: StepContext) -> bool:
        if ctx.run.progress.gpu_xids_collected:
            return False
        return any(group.launched for group in held_groups(self.host, ctx.run.machine_id))

    async def run(self, ctx: StepContext) -> None:
        held = [group for group in held_groups(self.host, ctx.run.machine_id) if group.launched]
        address_map = {a: b for group in held for a, b in group.guest_addresses.items()}
        events = await asyncio.to_thread(read_control_events, self.run_dir / RunDir.CONTROL_LOG)
        xids = xid_events(events, address_map)
        for xid in xids:
            targets = [xid.host_bdf] if xid.host_bdf else [b for g in held for b in g.claim.gpus]
            for bdf in targets:
                gpu_event(
                    self.host.gpu_store,
                    ctx.clock.now(),
                    bdf,
                    "xid",
                    _iommu_group(self.host, bdf),
                    {
                        "run_id": ctx.run.id,
                        "code": xid.code,
                        "text": xid.text,
                        "guest_address": xid.guest_address,
                        "quarantines": xid.needs_quarantine,
                    },
                )
        for group in held:
            mine = [x for x in xids if x.host_bdf is None or x.host_bdf in group.claim.functions]
            if mine:
                _update(self.host, ctx, group, xids=[*group.xids, *mine][:MAX_XIDS_PER_MACHINE])
        ctx.run.progress.gpu_xids_collected = True


# --- releasing groups to the handoff ------------------------------------------------------


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
    host: HostServices,
    clock: Clock,
    submit: Callable[[RunRecord], bool],
    bdfs: Sequence[str],
    why: str,
    run_id_prefix: str | None = None,
) -> None:
    """A handoff run for each IOMMU group among ``bdfs`` (already ``cleaning`` in the claim
    record), named by its first GPU; with ``run_id_prefix`` a repeated call submits nothing
    new."""
    leads: dict[str, list[str]] = {}
    for bdf in bdfs:
        group = [gpu.bdf for gpu in host.placement.group_of(bdf)] or [bdf]
        leads.setdefault(group[0], group)
    for lead, group in leads.items():
        run_id = f"handoff.{lead}.{run_id_prefix}" if run_id_prefix else None
        if submit(handoff_run(lead, clock.now(), run_id)):
            number = _iommu_group(host, lead)
            for bdf in group:
                gpu_event(host.gpu_store, clock.now(), bdf, "cleaning", number, {"why": why})


def release_gpus_for_handoff(
    host: HostServices, ctx: StepContext, bdfs: Sequence[str], why: str
) -> None:
    submit_handoffs(host, ctx.clock, ctx.submit, bdfs, why, ctx.run.id)


# --- the handoff ----------------------------------------------------------------------------


def _group_bdfs(host: HostServices, bdf: str) -> list[str]:
    group = [gpu.bdf for gpu in host.placement.group_of(bdf)]
    if not group:
        raise DeviceError(f"GPU {bdf} is not on this host", bdf=bdf)
    return group


def _states(host: HostServices, bdf: str) -> set[GpuState]:
    return {gpu.state for gpu in host.placement.group_of(bdf)}


def _case(ctx: StepContext) -> HandoffCase | None:
    case = ctx.run.progress.devices.get("case")
    return case if case in ("scrub", "release", "none") else None


@dataclass(frozen=True)
class HandoffStep:
    """A step of the handoff of the IOMMU group of ``bdf`` (its first GPU)."""

    host: HostServices
    bdf: str

    @property
    def devices(self) -> HostGpus:
        return _host_gpus(self.host)

    def cleaning(self) -> bool:
        return _states(self.host, self.bdf) == {GpuState.CLEANING}

    def held(self) -> HeldGroup:
        held = read_held_group(self.host.gpu_store, self.bdf)
        if held is None:
            raise DeviceError(f"IOMMU group of {self.bdf} has no claim record", bdf=self.bdf)
        return held

    def group(self) -> GpuGroup:
        return self.devices.group(self.held().claim.iommu_group)

    def save(self, ctx: StepContext, held: HeldGroup) -> None:
        write_held_group(self.host.gpu_store, self.bdf, held, ctx.clock.now())

    def event(self, ctx: StepContext, action: str, **detail: object) -> None:
        _group_event(self.host, ctx, _group_bdfs(self.host, self.bdf), action, **detail)


@dataclass(frozen=True)
class CheckVmReleased(HandoffStep):
    """Decide what the handoff does, and wait (retryable) until no process has the group's
    VFIO node open: QEMU reaped, the group closed."""

    name: str = "check_vm_released"

    async def should_run(self, ctx: StepContext) -> bool:
        return self.cleaning()

    async def run(self, ctx: StepContext) -> None:
        held = read_held_group(self.host.gpu_store, self.bdf)
        gpus = _group_bdfs(self.host, self.bdf)
        number = held.claim.iommu_group if held is not None else _iommu_group(self.host, self.bdf)
        if number is None:
            raise DeviceError(f"GPU {self.bdf} has no IOMMU group", bdf=self.bdf)
        group = self.devices.group(number)
        case: HandoffCase
        if held is not None:
            case = "scrub" if held.launched else "release"
        else:
            legacy = [
                record.binding
                for bdf in gpus
                if (record := self.host.gpu_store.get_gpu(bdf)) is not None and record.binding
            ]
            if legacy or self.devices.taken_by_vfio(group.bdfs):
                # No record of the group's history: scrub it as if a tenant had it.
                binding = GroupBinding.model_validate(legacy[0]) if legacy else None
                claim = GroupClaim(
                    iommu_group=number, gpus=group.gpus, functions=group.bdfs, binding=binding
                )
                self.save(ctx, HeldGroup(machine_id="", claim=claim, launched=True))
                case = "scrub"
            else:
                case = "none"
        if case != "none":
            await _device(ctx, check_vm_released, self.devices.paths, number)
        ctx.run.progress.devices.update({"case": case, "iommu_group": number})


@dataclass(frozen=True)
class DeactivateFabric(HandoffStep):
    """The group's Fabric Manager partition goes back before the reset."""

    name: str = "deactivate_fabric"

    async def should_run(self, ctx: StepContext) -> bool:
        if _case(ctx) in (None, "none"):
            return False
        return self.held().claim.fabric_partition is not None

    async def run(self, ctx: StepContext) -> None:
        partition = self.held().claim.fabric_partition
        assert partition is not None
        await _device(ctx, self.devices.deactivate_partition, partition)
        self.event(ctx, "fabric_deactivated", partition=partition)


@dataclass(frozen=True)
class HoldGroup(HandoffStep):
    """Every function on vfio-pci or no driver (a reset is never written under a host
    driver: the group quarantines instead), with the binding to release it with. A group an
    operator released is bound to vfio-pci again first, nothing holding it."""

    name: str = "hold_group"

    async def should_run(self, ctx: StepContext) -> bool:
        return _case(ctx) == "scrub"

    async def run(self, ctx: StepContext) -> None:
        held = self.held()
        claim = held.claim
        if held.rebind:
            sysfs, paths = self.devices.sysfs, self.devices.paths
            await _device(ctx, check_not_held, paths, sysfs, claim.gpus)
            binding = await _device(ctx, bind_group_to_vfio, sysfs, claim.gpus[0], claim.binding)
            claim = claim.model_copy(update={"binding": binding})
            held = held.model_copy(update={"claim": claim, "rebind": False})
            self.save(ctx, held)
        _, binding = await _device(ctx, hold_for_handoff, self.devices.context, claim)
        self.save(
            ctx, held.model_copy(update={"claim": claim.model_copy(update={"binding": binding})})
        )


@dataclass(frozen=True)
class RestageSettings(HandoffStep):
    """Settings read on vfio-pci (CC, PPCIe through gpu-admin-tools): the operator's
    defaults staged where a tenant changed them (the scrub's reset applies them)."""

    name: str = "restage_settings"

    async def should_run(self, ctx: StepContext) -> bool:
        return _case(ctx) == "scrub"

    async def run(self, ctx: StepContext) -> None:
        found = await _device(ctx, _stage, self.devices.context, self.group(), "vfio-pci", True)
        _put(ctx, "settings_before", found)


def _stage(
    context: HandoffContext, group: GpuGroup, bound_to: BoundTo, stage: bool
) -> list[StagedSettings]:
    return stage_settings(context, group, bound_to, stage=stage)


def _put(ctx: StepContext, key: str, items: Sequence[Any]) -> None:
    ctx.run.progress.devices[key] = [
        *ctx.run.progress.devices.get(key, []),
        *(item.model_dump(mode="json") for item in items),
    ]


@dataclass(frozen=True)
class ScrubGroup(HandoffStep):
    """The group's memory cleared: a secondary bus reset and the firmware's memory clear,
    or the trusted scrubber; an FLR never counts."""

    name: str = "scrub_group"

    async def should_run(self, ctx: StepContext) -> bool:
        return _case(ctx) == "scrub"

    async def run(self, ctx: StepContext) -> None:
        outcome = await _device(ctx, scrub_group, self.devices.context, self.group())
        ctx.run.progress.devices["scrubs"] = [outcome.model_dump(mode="json")]
        self.event(ctx, "scrubbed", method=outcome.method, via=outcome.via)


@dataclass(frozen=True)
class CheckGroupHealth(HandoffStep):
    """Right after the scrub, on vfio-pci: settings read again, each GPU's ids, link at its
    maximum width and speed, AER against the claim's baseline, and the guest's Xids. What
    fails quarantines at ``verify_group``, once the NVML checks are in too."""

    name: str = "check_group_health"

    async def should_run(self, ctx: StepContext) -> bool:
        return _case(ctx) == "scrub"

    async def run(self, ctx: StepContext) -> None:
        held, group, context = self.held(), self.group(), self.devices.context
        after = await _device(ctx, _stage, context, group, "vfio-pci", False)
        findings = await _device(ctx, vfio_health, context, group, held.claim, held.xids)
        ctx.run.progress.devices["settings_after"] = [s.model_dump(mode="json") for s in after]
        ctx.run.progress.devices["findings"] = _findings_json(findings)


def _findings_json(findings: dict[str, list[Finding]]) -> dict[str, list[dict[str, Any]]]:
    return {bdf: [f.model_dump(mode="json") for f in found] for bdf, found in findings.items()}


def _findings(ctx: StepContext) -> dict[str, list[Finding]]:
    stored: dict[str, list[dict[str, Any]]] = ctx.run.progress.devices.get("findings", {})
    return {bdf: [Finding.model_validate(f) for f in found] for bdf, found in stored.items()}


def _binding_now(devices: HostGpus, group: GpuGroup) -> GroupBinding:
    """What a group with no recorded binding has: functions on vfio-pci go to the kernel's
    choice of driver, the others stay where they are."""
    drivers = devices.drivers(group.bdfs)
    return GroupBinding(
        gpu_bdf=group.gpus[0],
        iommu_group=group.iommu_group,
        functions=[
            FunctionBinding(
                bdf=bdf,
                original_driver=None if driver == "vfio-pci" else driver,
                original_known=driver != "vfio-pci",
            )
            for bdf, driver in drivers.items()
        ],
        changed=False,
    )


@dataclass(frozen=True)
class RestoreHostDrivers(HandoffStep):
    """The group back on the drivers it had before hangar took it, and checked."""

    name: str = "restore_host_drivers"

    async def should_run(self, ctx: StepContext) -> bool:
        if _case(ctx) not in ("scrub", "release"):
            return False
        return self.devices.taken_by_vfio(self.held().claim.functions)

    async def run(self, ctx: StepContext) -> None:
        held = self.held()
        binding = held.claim.binding or _binding_now(self.devices, self.group())
        await _device(ctx, self.devices.release, binding)
        self.event(ctx, "host_drivers_restored")


@dataclass(frozen=True)
class ApplyStagedSettings(HandoffStep):
    """Back on the host drivers: ECC and MIG read through NVML and the defaults staged; a
    change a tenant already made take effect is undone by one more bind, scrub (its reset
    applies the defaults) and release, nothing on the host holding the GPUs meanwhile."""

    name: str = "apply_staged_settings"

    async def should_run(self, ctx: StepContext) -> bool:
        return _case(ctx) == "scrub"

    async def run(self, ctx: StepContext) -> None:
        held, context = self.held(), self.devices.context
        binding = held.claim.binding or _binding_now(self.devices, self.group())
        if self.devices.taken_by_vfio(held.claim.functions):
            # Resumed inside a cycle: finish it (scrub, release) before NVML can see the GPUs.
            outcome = await _device(ctx, scrub_group, context, self.group())
            await _device(ctx, self.devices.release, binding)
            _put(ctx, "scrubs", [outcome])
        before = await _device(ctx, _stage, context, self.group(), "nvidia", True)
        _put(ctx, "settings_before", before)
        cycle = await _device(ctx, apply_staged_settings, context, self.group(), binding, before)
        if cycle is not None:
            _put(ctx, "scrubs", [cycle])
            self.event(ctx, "settings_reapplied", method=cycle.method, via=cycle.via)


@dataclass(frozen=True)
class VerifyGroup(HandoffStep):
    """NVML's health of each GPU (row remapping, retired pages, uncorrectable ECC, recovery
    action) and every setting at the operator's default, or the group quarantines."""

    name: str = "verify_group"

    async def should_run(self, ctx: StepContext) -> bool:
        return _case(ctx) == "scrub"

    async def run(self, ctx: StepContext) -> None:
        group, context = self.group(), self.devices.context
        after_nvidia = await _device(ctx, _stage, context, group, "nvidia", False)
        findings = _findings(ctx)
        for bdf, found in (await _device(ctx, nvml_health, context, group)).items():
            findings[bdf] = [*findings.get(bdf, []), *found]
        stored = ctx.run.progress.devices.get("settings_after", [])
        after = [StagedSettings.model_validate(s) for s in stored] + after_nvidia
        ctx.run.progress.devices["findings"] = _findings_json(findings)
        await _device(ctx, verify_handoff, context, group, after, findings)


@dataclass(frozen=True)
class ReturnGroup(HandoffStep):
    """The group is clean: its record dropped, then every GPU of it free at once."""

    name: str = "return_group"

    async def should_run(self, ctx: StepContext) -> bool:
        return self.cleaning()

    async def run(self, ctx: StepContext) -> None:
        gpus = _group_bdfs(self.host, self.bdf)
        if read_held_group(self.host.gpu_store, self.bdf) is not None:
            self.save_none(ctx)
        for bdf in gpus:
            record = self.host.gpu_store.get_gpu(bdf)
            if record is not None and (record.quarantine_reason or record.binding):
                self.host.gpu_store.save_gpu(
                    record.model_copy(update={"quarantine_reason": "", "binding": None})
                )
        if self.host.placement.set_gpu_state(self.bdf, GpuState.FREE, GpuState.CLEANING):
            self.event(ctx, "free")

    def save_none(self, ctx: StepContext) -> None:
        write_held_group(self.host.gpu_store, self.bdf, None, ctx.clock.now())


@dataclass(frozen=True)
class QuarantineGroup(HandoffStep):
    """A handoff that fails keeps the whole group out of the pool until an operator releases
    it; the reason (and whether a device worker had to be killed) is recorded."""

    name: str = "quarantine_group"

    async def should_run(self, ctx: StepContext) -> bool:
        return _states(self.host, self.bdf) != {GpuState.QUARANTINED}

    async def run(self, ctx: StepContext) -> None:
        reason = ctx.run.error or "handoff failed"
        failure = ctx.run.progress.devices.get("failure", {})
        for bdf in _group_bdfs(self.host, self.bdf):
            record = self.host.gpu_store.get_gpu(bdf)
            if record is not None:
                self.host.gpu_store.save_gpu(
                    record.model_copy(
                        update={"quarantine_reason": reason, "updated_at": ctx.clock.now()}
                    )
                )
        self.host.placement.set_gpu_state(self.bdf, GpuState.QUARANTINED, None)
        self.event(
            ctx,
            "quarantined",
            reason=reason,
            code=failure.get("reason", ""),
            timed_out=failure.get("timed_out", False),
        )


def handoff_steps(host: HostServices, bdf: str) -> list[Step]:
    return [
        CheckVmReleased(host, bdf),
        DeactivateFabric(host, bdf),
        HoldGroup(host, bdf),
        RestageSettings(host, bdf),
        ScrubGroup(host, bdf),
        CheckGroupHealth(host, bdf),
        RestoreHostDrivers(host, bdf),
        ApplyStagedSettings(host, bdf),
        VerifyGroup(host, bdf),
        ReturnGroup(host, bdf),
    ]


def operator_release(host: HostServices, bdf: str, actor: str, reason: str, now: float) -> None:
    """An operator vouches for a quarantined group: its record says a tenant had it (so the
    handoff scrubs it), that it may be on its host drivers (bound to vfio-pci again first),
    with a fresh AER baseline and no Xids held against it."""
    devices = _host_gpus(host)
    lead = _group_bdfs(host, bdf)[0]
    held = read_held_group(host.gpu_store, lead)
    number = held.claim.iommu_group if held is not None else _iommu_group(host, lead)
    if number is None:
        raise DeviceError(f"GPU {lead} has no IOMMU group", bdf=lead)
    group = devices.group(number)
    baseline = devices.aer_baseline(group.bdfs)
    if held is None:
        claim = GroupClaim(iommu_group=number, gpus=group.gpus, functions=group.bdfs)
        held = HeldGroup(machine_id="", claim=claim)
    released = held.model_copy(
        update={
            "launched": True,
            "rebind": True,
            "xids": [],
            "claim": held.claim.model_copy(update={"aer_baseline": baseline}),
        }
    )
    write_held_group(host.gpu_store, lead, released, now)
    for gpu in group.gpus:
        gpu_event(
            host.gpu_store, now, gpu, "quarantine_released", number, {"reason": reason}, actor
        )
