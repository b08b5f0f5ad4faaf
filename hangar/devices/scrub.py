"""Clearing a GPU group's memory between tenants: a secondary bus reset, or a trusted scrubber.

A function-level reset does not clear GPU memory, and vfio-pci already performs one when
QEMU closes the device, so an FLR never counts as a scrub here. Two ways do:

1. **Secondary bus reset (SBR) of the parent port**, then waiting for the GPU's firmware to
   finish its memory clear, as NVIDIA's gpu-admin-tools do. The reset goes through the
   kernel so it saves and restores each function's config space: the port's
   ``reset_subordinate`` (Linux 6.14+) resets everything below it, multi-function slots
   included; on older kernels a single-function GPU alone on its bus gets ``bus`` written
   to its ``reset_method`` and then ``reset`` (the original list is written back after).
   The reset is refused, as libvirt refuses it, when anything that is not this group's
   shares the bus, and when any function below is bound to a driver other than vfio-pci
   (a host driver has no reset hooks: resetting under it gives Xid errors or a host hang).
   The firmware then reports in BAR0 (read through ``resource0``): boot done, then memory
   clear done (:class:`hangar.model.gpu_kinds.MemoryClearRegisters`).
2. **A trusted scrubber** (:class:`TrustedScrubber`), for hosts where the SBR is refused or
   the kind's firmware report is unknown: a command the operator installs that writes all
   of the GPU's memory and reads samples back (a host-side CUDA memset, or a scrubber VM
   that keeps the GPU on vfio-pci), reporting JSON on stdout (see :class:`CommandScrubber`).

Whatever fails raises :class:`DeviceError` with ``reason``; the handoff quarantines.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, ValidationError

from hangar.devices.deadline import PollClock, SystemPollClock, poll_until
from hangar.devices.groups import RESET_SUBORDINATE, GpuGroup, functions_below
from hangar.devices.pci import device_attr, read_pci_device
from hangar.devices.readiness import CommandRunner, SubprocessRunner
from hangar.devices.reset import reset_guard
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.worker import DeviceDeadlines
from hangar.errors import DeviceError
from hangar.model.gpu_kinds import MemoryClearRegisters, gpu_kind_for_device_id

BAR0 = "resource0"
ALL_ONES = 0xFFFFFFFF
POLL_INTERVAL_S = 0.1

ScrubMethod = Literal["secondary-bus-reset", "trusted-scrubber"]


class MemoryClear(BaseModel):
    model_config = ConfigDict(frozen=True)

    bdf: str
    boot_register: int
    clear_register: int


class ScrubOutcome(BaseModel):
    """What cleared the group's memory, and the evidence."""

    iommu_group: int
    method: ScrubMethod
    via: str
    """``reset_subordinate``, ``reset_method=bus``, or the scrubber's name."""
    port: str | None = None
    memory_clear: list[MemoryClear] = []
    scrubber_report: dict[str, int] = {}
    sbr_refused: str | None = None
    """Why the SBR was not used, when a trusted scrubber ran instead."""


def sbr_refusal(sysfs: SysfsRoot, group: GpuGroup) -> str | None:
    """Why a secondary bus reset of the group's parent port is refused, or None."""
    if group.parent_port is None:
        return "the group's GPUs have no single parent port to reset"
    members = {*group.bdfs, *group.bridges}
    others = [bdf for bdf in functions_below(sysfs, group.parent_port) if bdf not in members]
    if others:
        shown = ", ".join(
            f"{bdf} ({read_pci_device(sysfs, bdf).driver or 'no driver'})" for bdf in others
        )
        return f"other devices share the bus below {group.parent_port}: {shown}"
    if not group.parent_port_can_reset_subordinate:
        [only, *rest] = group.bdfs
        methods = read_pci_device(sysfs, only).reset_methods or []
        if rest or "bus" not in methods:
            return (
                f"{group.parent_port} has no reset_subordinate (Linux 6.14+) and the kernel "
                "refuses a bus reset for a function that shares its bus"
                if rest
                else f"{only} does not list a bus reset (reset_method: {' '.join(methods)})"
            )
    return None


def secondary_bus_reset(sysfs: SysfsRoot, group: GpuGroup) -> str:
    """Reset the group's parent port's secondary bus through the kernel; returns how.

    Each write goes through the sysfs writer, so with :func:`killable_sysfs` it has the
    deadline :class:`DeviceDeadlines` gives it.
    """
    refusal = sbr_refusal(sysfs, group)
    if refusal is not None:
        raise DeviceError(
            f"secondary bus reset of IOMMU group {group.iommu_group} refused: {refusal}",
            reason="sbr_refused",
            iommu_group=group.iommu_group,
            retry=False,
        )
    assert group.parent_port is not None
    reset_guard(sysfs, [*group.bdfs], "reset the bus")
    if group.parent_port_can_reset_subordinate:
        sysfs.write(device_attr(group.parent_port, RESET_SUBORDINATE), "1")
        return RESET_SUBORDINATE
    [only] = group.bdfs
    listed = " ".join(read_pci_device(sysfs, only).reset_methods or [])
    sysfs.write(device_attr(only, "reset_method"), "bus")
    try:
        sysfs.write(device_attr(only, "reset"), "1")
    finally:
        sysfs.write(device_attr(only, "reset_method"), listed)
    return "reset_method=bus"


def bus_reset_scrub_refusal(sysfs: SysfsRoot, group: GpuGroup) -> str | None:
    """Why a bus reset and the firmware's memory clear cannot scrub this group (so only a
    trusted scrubber can), or None when they can."""
    return sbr_refusal(sysfs, group) or _memory_clear_unknown(sysfs, group)


def read_bar0_register(sysfs: SysfsRoot, bdf: str, offset: int) -> int | None:
    """A 32-bit register of BAR0, read by mapping ``resource0``; None if it cannot be."""
    page = mmap.PAGESIZE
    base = offset - offset % page
    try:
        fd = os.open(sysfs.path(device_attr(bdf, BAR0)), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=base) as window:
            return int.from_bytes(window[offset - base : offset - base + 4], "little")
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def wait_for_memory_clear(
    sysfs: SysfsRoot,
    bdf: str,
    registers: MemoryClearRegisters,
    *,
    timeout_s: float,
    clock: PollClock,
    interval_s: float = POLL_INTERVAL_S,
) -> MemoryClear:
    """Poll BAR0 until the firmware says it booted and cleared memory, within ``timeout_s``."""

    def done() -> MemoryClear | None:
        boot = read_bar0_register(sysfs, bdf, registers.boot_offset)
        clear = read_bar0_register(sysfs, bdf, registers.clear_offset)
        if boot is None or clear is None or ALL_ONES in (boot, clear):
            return None
        if boot == registers.boot_done and clear & registers.clear_mask:
            return MemoryClear(bdf=bdf, boot_register=boot, clear_register=clear)
        return None

    return poll_until(
        done,
        timeout_s=timeout_s,
        interval_s=interval_s,
        clock=clock,
        what=f"{bdf}: waiting for the firmware's memory clear after the bus reset",
        bdf=bdf,
        reason="memory_clear_timeout",
    )


class TrustedScrubber(Protocol):
    name: str

    def scrub(
        self, sysfs: SysfsRoot, group: GpuGroup, deadlines: DeviceDeadlines
    ) -> dict[str, int]:
        """Clear every GPU of the group; return the evidence; raise DeviceError on failure."""
        ...


class ScrubberReport(BaseModel):
    """What a scrubber command prints (one JSON object) for one GPU."""

    model_config = ConfigDict(extra="forbid")

    bytes_total: int
    bytes_written: int
    samples_checked: int
    mismatches: int


class CommandScrubber:
    """Runs an operator's scrubber command per GPU, ``{bdf}`` replaced in its arguments.

    The command must write every byte of the GPU's memory and read samples back, then print
    :class:`ScrubberReport` as JSON: ``{"bytes_total": N, "bytes_written": N,
    "samples_checked": M, "mismatches": 0}``. Anything else fails the scrub. It runs with
    the ``scrub_s`` deadline and is killed past it.
    """

    def __init__(
        self, argv: Sequence[str], name: str = "command", runner: CommandRunner | None = None
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.runner = runner

    def scrub(
        self, sysfs: SysfsRoot, group: GpuGroup, deadlines: DeviceDeadlines
    ) -> dict[str, int]:
        runner = self.runner or SubprocessRunner(timeout_s=deadlines.scrub_s)
        totals = {"bytes_written": 0, "samples_checked": 0}
        for bdf in group.gpus:
            argv = [part.replace("{bdf}", bdf) for part in self.argv]
            done = runner.run(argv)
            if done.returncode != 0:
                raise DeviceError(
                    f"scrubber {self.name} failed on {bdf} (exit {done.returncode}): "
                    f"{done.stderr.strip()[-500:]}",
                    reason="scrubber_failed",
                    bdf=bdf,
                    timed_out=done.returncode == 124,
                )
            try:
                report = ScrubberReport.model_validate(json.loads(done.stdout))
            except (json.JSONDecodeError, ValidationError) as error:
                raise DeviceError(
                    f"scrubber {self.name} printed no report for {bdf}: {error}",
                    reason="scrubber_failed",
                    bdf=bdf,
                ) from error
            problem = _report_problem(report)
            if problem is not None:
                raise DeviceError(
                    f"scrubber {self.name} on {bdf}: {problem}", reason="scrubber_failed", bdf=bdf
                )
            totals["bytes_written"] += report.bytes_written
            totals["samples_checked"] += report.samples_checked
        return totals


def _report_problem(report: ScrubberReport) -> str | None:
    if report.bytes_total <= 0 or report.bytes_written < report.bytes_total:
        return f"wrote {report.bytes_written} of {report.bytes_total} bytes"
    if report.samples_checked <= 0:
        return "read nothing back"
    if report.mismatches:
        return f"{report.mismatches} of {report.samples_checked} samples read back wrong"
    return None


def scrub(
    sysfs: SysfsRoot,
    group: GpuGroup,
    *,
    deadlines: DeviceDeadlines | None = None,
    clock: PollClock | None = None,
    trusted: TrustedScrubber | None = None,
) -> ScrubOutcome:
    """Clear the group's GPU memory: SBR and the firmware's clear, else the trusted scrubber.

    Every function must be on vfio-pci or on no driver. Raises DeviceError (``reason``:
    ``host_driver_bound``, ``sbr_refused``, ``memory_clear_timeout``, ``no_memory_clear``,
    ``scrubber_failed``, or a write's ``timed_out``) when the memory cannot be shown clear.
    """
    deadlines = deadlines or DeviceDeadlines()
    clock = clock or SystemPollClock()
    reset_guard(sysfs, group.bdfs, "scrub")
    refusal = bus_reset_scrub_refusal(sysfs, group)
    if refusal is not None:
        if trusted is None:
            raise DeviceError(
                f"cannot scrub IOMMU group {group.iommu_group}: {refusal}, and no trusted "
                "scrubber is configured (an FLR does not clear GPU memory)",
                reason="sbr_refused",
                iommu_group=group.iommu_group,
                retry=False,
            )
        report = trusted.scrub(sysfs, group, deadlines)
        return ScrubOutcome(
            iommu_group=group.iommu_group,
            method="trusted-scrubber",
            via=trusted.name,
            scrubber_report=report,
            sbr_refused=refusal,
        )
    via = secondary_bus_reset(sysfs, group)
    cleared = []
    started = clock.monotonic()
    for bdf in group.gpus:
        registers = _registers(sysfs, bdf)
        assert registers is not None  # _memory_clear_unknown checked every GPU
        remaining = deadlines.memory_clear_s - (clock.monotonic() - started)
        cleared.append(
            wait_for_memory_clear(sysfs, bdf, registers, timeout_s=max(remaining, 0.0), clock=clock)
        )
    return ScrubOutcome(
        iommu_group=group.iommu_group,
        method="secondary-bus-reset",
        via=via,
        port=group.parent_port,
        memory_clear=cleared,
    )


def _registers(sysfs: SysfsRoot, bdf: str) -> MemoryClearRegisters | None:
    kind = gpu_kind_for_device_id(read_pci_device(sysfs, bdf).device_id)
    return None if kind is None else kind.memory_clear


def _memory_clear_unknown(sysfs: SysfsRoot, group: GpuGroup) -> str | None:
    unknown = [bdf for bdf in group.gpus if _registers(sysfs, bdf) is None]
    if unknown:
        return f"hangar does not know how {', '.join(unknown)} reports its firmware memory clear"
    return None
