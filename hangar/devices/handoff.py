"""A GPU group's life on a host, in the order the agent's durable steps must follow.

Claim (before boot)::

    group = group_of(sysfs, gpu_bdf)             # or plan_group_claim(...) over free groups
    claim = begin_claim(sysfs, paths, group)     # usable, nothing holds it, AER baseline
    claim = bind_claim(sysfs, paths, claim)      # whole group to vfio-pci (stored binding)
    # then: Fabric Manager partition activated (fabric.py) or NVLink off for one GPU,
    # and QEMU gets every function (vmm.qemu_argv topology, companions multifunction=on)

Handoff (after the VM), :func:`run_handoff` does all of it; each step is idempotent so a
durable run may resume at any of them::

    check_vm_released(paths, group)      # QEMU reaped and /dev/vfio/<group> closed
    reset_guard(sysfs, group.bdfs)       # only vfio-pci or no driver below: never reset
                                         #   under a host driver
    settings on vfio-pci (CC, PPCIe):    read_staged_settings + restore_operator_defaults
    scrub(...)                           # SBR of the parent port + firmware memory clear,
                                         #   or the trusted scrubber; FLR never counts
    health on vfio-pci                   # ids, link width and speed at max, AER vs baseline
    verify CC/PPCIe
    release_group(sysfs, binding)        # host drivers back, each write with a deadline
    settings on nvidia (ECC, MIG) + NVML health (row remap, retired pages, ECC, recovery)
    if a setting is off its default:     stage it, check nothing holds the GPU, bind to
                                         #   vfio-pci, scrub again (the reset applies it),
                                         #   release, read again
    verify_settings                      # a mismatch quarantines

Any :class:`DeviceError` means quarantine (its ``reason`` says why; ``timed_out`` when a
device operation hung past its deadline). Run everything through :func:`killable_sysfs`
and with :class:`NvmlSettings` / a :class:`WorkerRunner` so nothing blocks the agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel

from hangar.devices.deadline import PollClock, SystemPollClock
from hangar.devices.groups import GpuGroup, read_gpu_group
from hangar.devices.health import AerCounts, Finding, health_check, nvml_findings, read_aer
from hangar.devices.holders import DeviceHolder, nvidia_holders, vfio_group_holders
from hangar.devices.hostpaths import HostPaths
from hangar.devices.nvml import NvmlGpu
from hangar.devices.pci import read_pci_device
from hangar.devices.reset import reset_guard
from hangar.devices.scrub import ScrubOutcome, TrustedScrubber, scrub
from hangar.devices.settings import (
    BoundTo,
    OperatorDefaults,
    SettingsSource,
    StagedSettings,
    read_staged_settings,
    restore_operator_defaults,
    verify_settings,
)
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.vfio import GroupBinding, bind_group_to_vfio, release_group
from hangar.devices.worker import DeviceDeadlines, DeviceRunner, WorkerRunner
from hangar.devices.xid import XidEvent
from hangar.errors import DeviceError


class GroupClaim(BaseModel):
    """What the store keeps per claimed group (the claim unit), from claim to free."""

    iommu_group: int
    gpus: list[str]
    functions: list[str]
    """Every function that passes through: GPUs and companions."""
    aer_baseline: dict[str, AerCounts] = {}
    binding: GroupBinding | None = None
    fabric_partition: int | None = None
    nvlink_disabled: bool = False


class HandoffReport(BaseModel):
    iommu_group: int
    scrubs: list[ScrubOutcome]
    settings_before: list[StagedSettings]
    settings_after: list[StagedSettings]
    findings: dict[str, list[Finding]]
    restore_cycles: int


@dataclass
class HandoffContext:
    """Everything a handoff needs besides the group; the agent builds one per host."""

    sysfs: SysfsRoot
    paths: HostPaths
    deadlines: DeviceDeadlines = field(default_factory=DeviceDeadlines)
    defaults: OperatorDefaults = field(default_factory=OperatorDefaults)
    settings_sources: Sequence[SettingsSource] = ()
    trusted_scrubber: TrustedScrubber | None = None
    nvml_runner: DeviceRunner | None = None
    """Runs NVML health reads (a WorkerRunner by default); None with ``nvml_module=""``
    skips NVML (hosts without the nvidia driver)."""
    nvml_module: str = "pynvml"
    clock: PollClock = field(default_factory=SystemPollClock)


def check_not_held(paths: HostPaths, sysfs: SysfsRoot, bdfs: Sequence[str]) -> None:
    """Raise (``reason="device_held"``, retryable) if a process holds a GPU the nvidia
    driver would have to let go of: its unbind would wait forever."""
    holders: list[DeviceHolder] = []
    for bdf in bdfs:
        if read_pci_device(sysfs, bdf).driver == "nvidia":
            holders.extend(nvidia_holders(paths, bdf))
    if holders:
        raise DeviceError(
            "GPU in use on the host: "
            + "; ".join(holder.describe() for holder in holders)
            + " (stop nvidia-persistenced, DCGM and NVML users for passthrough GPUs)",
            reason="device_held",
            holders=[holder.model_dump() for holder in holders],
            retry=True,
        )


def check_vm_released(paths: HostPaths, group: GpuGroup | int) -> None:
    """Raise (``reason="vfio_group_open"``, retryable) while a process has the group's VFIO
    node open: the handoff starts only once QEMU is reaped and the group closed."""
    number = group if isinstance(group, int) else group.iommu_group
    holders = vfio_group_holders(paths, number)
    if holders:
        raise DeviceError(
            f"IOMMU group {number} is still open: "
            + "; ".join(holder.describe() for holder in holders),
            reason="vfio_group_open",
            iommu_group=number,
            holders=[holder.model_dump() for holder in holders],
            retry=True,
        )


def begin_claim(sysfs: SysfsRoot, paths: HostPaths, group: GpuGroup) -> GroupClaim:
    """Check the group can go to a tenant now, and record its AER baseline."""
    if not group.usable:
        raise DeviceError(
            f"IOMMU group {group.iommu_group} cannot be claimed: " + "; ".join(group.problems),
            reason="group_unusable",
            iommu_group=group.iommu_group,
        )
    check_not_held(paths, sysfs, group.gpus)
    baseline = {bdf: aer for bdf in group.bdfs if (aer := read_aer(sysfs, bdf)) is not None}
    return GroupClaim(
        iommu_group=group.iommu_group,
        gpus=group.gpus,
        functions=group.bdfs,
        aer_baseline=baseline,
    )


def bind_claim(sysfs: SysfsRoot, paths: HostPaths, claim: GroupClaim) -> GroupClaim:
    """Bind the whole group to vfio-pci (idempotent; pass the stored claim back)."""
    check_not_held(paths, sysfs, claim.gpus)
    binding = bind_group_to_vfio(sysfs, claim.gpus[0], claim.binding)
    return claim.model_copy(update={"binding": binding})


def run_handoff(
    context: HandoffContext, claim: GroupClaim, xids: Sequence[XidEvent] = ()
) -> HandoffReport:
    """The whole handoff of a group after its VM, in order; DeviceError means quarantine.

    The agent runs the same phases as durable steps (:func:`hold_for_handoff`,
    :func:`stage_settings`, :func:`scrub_group`, :func:`vfio_health`, ``release_group``,
    :func:`apply_staged_settings`, :func:`nvml_health`, :func:`verify_handoff`).
    """
    group, binding = hold_for_handoff(context, claim)
    before = stage_settings(context, group, "vfio-pci", stage=True)
    scrubs = [scrub_group(context, group)]
    after_vfio = stage_settings(context, group, "vfio-pci", stage=False)
    findings = vfio_health(context, group, claim, xids)
    release_group(context.sysfs, binding)
    before_nvidia = stage_settings(context, group, "nvidia", stage=True)
    cycle = apply_staged_settings(context, group, binding, before_nvidia)
    after_nvidia = stage_settings(context, group, "nvidia", stage=False)
    for bdf, found in nvml_health(context, group).items():
        findings[bdf] = [*findings.get(bdf, []), *found]
    verify_handoff(context, group, [*after_vfio, *after_nvidia], findings)
    return HandoffReport(
        iommu_group=group.iommu_group,
        scrubs=[*scrubs, *([cycle] if cycle is not None else [])],
        settings_before=[*before, *before_nvidia],
        settings_after=[*after_vfio, *after_nvidia],
        findings=findings,
        restore_cycles=int(cycle is not None),
    )


def hold_for_handoff(context: HandoffContext, claim: GroupClaim) -> tuple[GpuGroup, GroupBinding]:
    """The handoff's start: the VM released the group, every function is on vfio-pci or on
    no driver (never reset under a host driver), and the binding to release it with (the
    stored one, or the group bound now when none was stored)."""
    sysfs, paths = context.sysfs, context.paths
    check_vm_released(paths, claim.iommu_group)
    group = read_gpu_group(sysfs, claim.iommu_group)
    reset_guard(sysfs, group.bdfs, "start the handoff")
    binding = claim.binding or _binding_of(sysfs, group)
    return group, binding


def _binding_of(sysfs: SysfsRoot, group: GpuGroup) -> GroupBinding:
    """A group with no stored binding (a crash before the bind was recorded): whatever is
    on vfio-pci stays there until the scrub, then goes to the kernel's choice."""
    return bind_group_to_vfio(sysfs, group.gpus[0])


def scrub_group(context: HandoffContext, group: GpuGroup) -> ScrubOutcome:
    """Clear the group's memory (:func:`hangar.devices.scrub.scrub`) with the context's
    deadlines, clock and trusted scrubber."""
    return scrub(
        context.sysfs,
        group,
        deadlines=context.deadlines,
        clock=context.clock,
        trusted=context.trusted_scrubber,
    )


def stage_settings(
    context: HandoffContext, group: GpuGroup, bound_to: BoundTo, *, stage: bool
) -> list[StagedSettings]:
    """Each GPU's settings that the sources able to read them with the group bound to
    ``bound_to`` report; with ``stage`` the operator's defaults are staged where they
    differ (a reset applies them)."""
    sources = [s for s in context.settings_sources if s.bound_to == bound_to]
    if not sources:
        return []
    found = []
    for bdf in group.gpus:
        staged = read_staged_settings(sources, bdf, bound_to)
        if stage:
            restore_operator_defaults(sources, staged, context.defaults)
        found.append(staged)
    return found


def vfio_health(
    context: HandoffContext,
    group: GpuGroup,
    claim: GroupClaim,
    xids: Sequence[XidEvent] = (),
) -> dict[str, list[Finding]]:
    """What sysfs shows of each GPU right after the scrub, on vfio-pci: ids, link at its
    maximum width and speed, AER against the claim's baseline; and the guest's Xids (an
    Xid with no known host address counts against every GPU)."""
    return {
        bdf: health_check(
            context.sysfs,
            bdf,
            xids=[x for x in xids if x.host_bdf in (bdf, None)],
            baseline=claim.aer_baseline.get(bdf),
            require_max_link_speed=True,
        ).findings
        for bdf in group.gpus
    }


def apply_staged_settings(
    context: HandoffContext,
    group: GpuGroup,
    binding: GroupBinding,
    staged_on_nvidia: Sequence[StagedSettings],
) -> ScrubOutcome | None:
    """A tenant's change that already took effect (ECC, MIG current off the default) is
    undone only by a reset: with the defaults staged, bind the group again, scrub (the bus
    reset applies them) and give it back. None when nothing needed it."""
    if not any(staged.needs_reset(context.defaults) for staged in staged_on_nvidia):
        return None
    check_not_held(context.paths, context.sysfs, group.gpus)
    bind_group_to_vfio(context.sysfs, group.gpus[0], binding)
    outcome = scrub_group(context, read_gpu_group(context.sysfs, group.iommu_group))
    release_group(context.sysfs, binding)
    return outcome


def nvml_health(context: HandoffContext, group: GpuGroup) -> dict[str, list[Finding]]:
    """What NVML says of each GPU back on its host driver (row remapping, retired pages,
    uncorrectable ECC, recovery action); nothing when the context skips NVML."""
    return {bdf: _nvml_health(context, bdf) for bdf in group.gpus}


def verify_handoff(
    context: HandoffContext,
    group: GpuGroup,
    settings_after: Sequence[StagedSettings],
    findings: dict[str, list[Finding]],
) -> None:
    """Raise DeviceError unless every setting is the operator's default (``reason``
    ``settings_mismatch``) and no finding failed (``unhealthy``)."""
    for staged in settings_after:
        verify_settings(staged, context.defaults)
    failed = [
        f"{bdf}: {f.check}: {f.detail}"
        for bdf, fs in findings.items()
        for f in fs
        if f.severity == "fail"
    ]
    if failed:
        raise DeviceError(
            f"IOMMU group {group.iommu_group} failed its health check: " + "; ".join(failed),
            reason="unhealthy",
            iommu_group=group.iommu_group,
            findings=failed,
            retry=False,
        )


def _nvml_health(context: HandoffContext, bdf: str) -> list[Finding]:
    if not context.nvml_module:
        return []
    runner = context.nvml_runner or WorkerRunner()
    report = runner.call(
        "hangar.devices.nvml:read_nvml_gpu",
        {"bdf": bdf, "module": context.nvml_module},
        timeout_s=context.deadlines.nvml_s,
        what=f"reading {bdf}'s health through NVML",
    )
    return nvml_findings(NvmlGpu.model_validate(report))
