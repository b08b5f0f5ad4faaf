"""Function resets of a GPU group, verified, and the one guard before every reset write.

The reset goes through each function's ``reset`` attribute, after checking that
``reset_method`` lists FLR, PM or bus reset, and only while the function is bound to
vfio-pci or to no driver (:func:`reset_guard`): the nvidia driver has no
reset_prepare/reset_done hooks, so resetting a GPU under it gives Xid errors or hangs the
host. Verification reads the function's config space (its first bytes must be the vendor
and device ids sysfs recorded at boot), checks the function is still present and bound to
the expected driver. A function that fails any of this puts the GPU in quarantine.

A function reset is not a scrub: FLR does not clear GPU memory (and vfio-pci already does
one when QEMU closes the device). Clearing memory is :mod:`hangar.devices.scrub`'s job;
:class:`VerifyOnlyScrubber` only keeps the older per-GPU handoff running until the agent
moves to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from pydantic import BaseModel

from hangar.clock import Clock, SystemClock
from hangar.devices.iommu import read_group_members
from hangar.devices.pci import PCI_DEVICES, device_attr, read_pci_device
from hangar.devices.readiness import VFIO_PCI
from hangar.devices.sysfs import SysfsRoot
from hangar.errors import DeviceError

ACCEPTED_RESET_METHODS = ("flr", "pm", "bus")
RESETTABLE_DRIVERS = (VFIO_PCI, None)

_CONFIG_ID_BYTES = 4
_ABSENT_VENDOR_ID = 0xFFFF


def usable_reset_methods(listed: list[str] | None) -> list[str]:
    """The accepted methods among those ``reset_method`` lists, in the kernel's order."""
    return [method for method in listed or [] if method in ACCEPTED_RESET_METHODS]


def reset_method_problem(listed: list[str] | None) -> str | None:
    """Why a function cannot be reset between tenants, or None when it can."""
    if listed is None:
        return "the kernel exposes no reset_method for it"
    if not usable_reset_methods(listed):
        shown = " ".join(listed) or "nothing"
        return f"no FLR, PM or bus reset (reset_method lists {shown})"
    return None


def reset_guard(sysfs: SysfsRoot, bdfs: Sequence[str], action: str = "reset") -> None:
    """Raise unless every function is bound to vfio-pci or to nothing (``reason``:
    ``host_driver_bound``): checked before anything hangar writes that resets a device."""
    bound = {bdf: read_pci_device(sysfs, bdf).driver for bdf in bdfs}
    wrong = {bdf: driver for bdf, driver in bound.items() if driver not in RESETTABLE_DRIVERS}
    if wrong:
        shown = ", ".join(f"{bdf} is bound to {driver}" for bdf, driver in wrong.items())
        raise DeviceError(
            f"refusing to {action}: {shown} (only vfio-pci or no driver may be reset)",
            reason="host_driver_bound",
            drivers=wrong,
            retry=False,
        )


class ScrubResult(BaseModel):
    method: str
    ok: bool
    detail: str


class Scrubber(Protocol):
    def scrub(self, sysfs: SysfsRoot, gpu_bdf: str) -> ScrubResult: ...


class VerifyOnlyScrubber:
    """Overwrites nothing and clears nothing: kept for the per-GPU handoff only. The group
    handoff scrubs with :func:`hangar.devices.scrub.scrub`."""

    def scrub(self, sysfs: SysfsRoot, gpu_bdf: str) -> ScrubResult:
        return ScrubResult(
            method="verify-only",
            ok=True,
            detail="no memory scrub performed; relies on the function reset and its verification",
        )


class FunctionReset(BaseModel):
    bdf: str
    reset_methods: list[str] | None
    reset_written: bool
    expected_driver: str | None = None
    config_vendor_id: int | None = None
    config_device_id: int | None = None
    driver_after: str | None = None
    problems: list[str] = []


class ResetOutcome(BaseModel):
    gpu_bdf: str
    ok: bool
    quarantine: bool
    """True when any function failed to reset or verify: the caller quarantines the GPU."""
    reason: str | None = None
    functions: list[FunctionReset]
    scrub: ScrubResult | None = None
    """None when verification failed and the scrub step was not run."""
    started_at: float
    finished_at: float


def reset_and_verify(
    sysfs: SysfsRoot,
    gpu_bdf: str,
    *,
    expected_driver: str | Mapping[str, str | None] | None = VFIO_PCI,
    scrubber: Scrubber | None = None,
    clock: Clock | None = None,
) -> ResetOutcome:
    """Reset the GPU and the functions bound with it, verify each, then run the scrub hook.

    ``expected_driver`` is the driver every function must be bound to afterwards (None:
    no driver), or a driver per function address (after a release, the original drivers
    of the :class:`GroupBinding`). Safe to run again: a reset leaves nothing half-done.
    """
    clock = clock or SystemClock()
    scrubber = scrubber or VerifyOnlyScrubber()
    started_at = clock.now()
    functions = [
        _reset_function(sysfs, bdf, _expected(expected_driver, bdf))
        for bdf in _functions_to_reset(sysfs, gpu_bdf)
    ]
    problems = [f"{result.bdf}: {problem}" for result in functions for problem in result.problems]
    scrub = None
    if not problems:
        scrub = scrubber.scrub(sysfs, gpu_bdf)
        if not scrub.ok:
            problems.append(f"scrub ({scrub.method}) failed: {scrub.detail}")
    return ResetOutcome(
        gpu_bdf=gpu_bdf,
        ok=not problems,
        quarantine=bool(problems),
        reason="; ".join(problems) or None,
        functions=functions,
        scrub=scrub,
        started_at=started_at,
        finished_at=clock.now(),
    )


def _expected(expected: str | Mapping[str, str | None] | None, bdf: str) -> str | None:
    if expected is None or isinstance(expected, str):
        return expected
    return expected.get(bdf)


def _functions_to_reset(sysfs: SysfsRoot, gpu_bdf: str) -> list[str]:
    """The GPU and the functions of its IOMMU group that pass through with it."""
    try:
        group = read_pci_device(sysfs, gpu_bdf).iommu_group
    except DeviceError:
        return [gpu_bdf]  # absent: _reset_function reports it
    if group is None:
        return [gpu_bdf]
    members = [m.bdf for m in read_group_members(sysfs, group) if m.passes_through]
    return [gpu_bdf, *(bdf for bdf in members if bdf != gpu_bdf)]


def _reset_function(sysfs: SysfsRoot, bdf: str, expected_driver: str | None) -> FunctionReset:
    try:
        device = read_pci_device(sysfs, bdf)
    except DeviceError:
        return FunctionReset(
            bdf=bdf,
            reset_methods=None,
            reset_written=False,
            expected_driver=expected_driver,
            problems=["device not present"],
        )
    refusal = reset_method_problem(device.reset_methods)
    if refusal is None and device.driver not in RESETTABLE_DRIVERS:
        refusal = f"bound to the host driver {device.driver}, which cannot survive a reset"
    if refusal is not None:
        return FunctionReset(
            bdf=bdf,
            reset_methods=device.reset_methods,
            reset_written=False,
            expected_driver=expected_driver,
            driver_after=device.driver,
            problems=[f"not reset: {refusal}"],
        )
    try:
        sysfs.write(device_attr(bdf, "reset"), "1")
    except DeviceError as error:
        return FunctionReset(
            bdf=bdf,
            reset_methods=device.reset_methods,
            reset_written=False,
            expected_driver=expected_driver,
            driver_after=device.driver,
            problems=[f"reset failed: {error.message}"],
        )
    return _verify(
        sysfs, bdf, device.vendor_id, device.device_id, device.reset_methods, expected_driver
    )


def _verify(
    sysfs: SysfsRoot,
    bdf: str,
    vendor_id: int,
    device_id: int,
    reset_methods: list[str] | None,
    expected_driver: str | None,
) -> FunctionReset:
    problems = []
    if not sysfs.exists(f"{PCI_DEVICES}/{bdf}"):
        problems.append("device gone from the bus after reset")
    config = sysfs.read_bytes(device_attr(bdf, "config"), _CONFIG_ID_BYTES) or b""
    config_vendor = int.from_bytes(config[0:2], "little") if len(config) >= 2 else None
    config_device = int.from_bytes(config[2:4], "little") if len(config) >= 4 else None
    if config_vendor is None:
        problems.append("config space unreadable after reset")
    elif config_vendor == _ABSENT_VENDOR_ID:
        problems.append("config space reads ffff after reset: the device does not respond")
    elif (config_vendor, config_device) != (vendor_id, device_id):
        problems.append(
            f"config space reads {config_vendor:04x}:{(config_device or 0):04x}, "
            f"expected {vendor_id:04x}:{device_id:04x}"
        )
    driver = sysfs.link_name(device_attr(bdf, "driver"))
    if driver != expected_driver:
        problems.append(
            f"bound to {driver or 'no driver'} after reset, expected {expected_driver or 'none'}"
        )
    return FunctionReset(
        bdf=bdf,
        reset_methods=reset_methods,
        reset_written=True,
        expected_driver=expected_driver,
        config_vendor_id=config_vendor,
        config_device_id=config_device,
        driver_after=driver,
        problems=problems,
    )
