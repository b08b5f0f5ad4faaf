"""Moving a GPU's IOMMU group to vfio-pci for a VM, and back to its drivers afterwards.

Binding uses ``driver_override`` (never ``new_id``, which would capture every card with
the same ids): for each function, ``vfio-pci`` goes into ``driver_override``, the function
is unbound from its driver, and its address is written to ``drivers_probe``. Release
clears the override, unbinds from vfio-pci and probes again, so the kernel binds the
native driver, which must be the one recorded at bind time.

Both are idempotent, for durable steps: binding a bound group and releasing a released
group write nothing.
"""

from __future__ import annotations

from pydantic import BaseModel

from hangar.devices.iommu import passthrough_functions
from hangar.devices.pci import DRIVERS_PROBE, PCI_DRIVERS, device_attr, read_pci_device
from hangar.devices.readiness import VFIO_PCI
from hangar.devices.sysfs import SysfsRoot
from hangar.errors import DeviceError

# What the kernel takes as "no override" (a lone newline clears the attribute).
_CLEAR_OVERRIDE = "\n"


class FunctionBinding(BaseModel):
    bdf: str
    original_driver: str | None
    """The driver before hangar bound the function to vfio-pci; None: it had none."""
    original_known: bool = True
    """False when the function was on vfio-pci already and no earlier record was given:
    release then lets the kernel pick the driver."""


class GroupBinding(BaseModel):
    """What :func:`bind_group_to_vfio` did; the caller stores it to release later."""

    gpu_bdf: str
    iommu_group: int
    functions: list[FunctionBinding]
    changed: bool
    """False when the group was bound already and nothing was written."""


class FunctionRelease(BaseModel):
    bdf: str
    driver_before: str | None
    driver_after: str | None


class GroupRelease(BaseModel):
    gpu_bdf: str
    functions: list[FunctionRelease]
    changed: bool


def bind_group_to_vfio(
    sysfs: SysfsRoot, gpu_bdf: str, previous: GroupBinding | None = None
) -> GroupBinding:
    """Bind every function of the GPU's IOMMU group to vfio-pci.

    ``previous`` is the record of an earlier, possibly interrupted, bind of this group:
    its original drivers are kept for functions already moved to vfio-pci. Raises
    DeviceError (with the partial record in ``binding``) when a function does not bind.
    """
    group, members = passthrough_functions(sysfs, gpu_bdf)
    if not sysfs.exists(f"{PCI_DRIVERS}/{VFIO_PCI}"):
        raise DeviceError(
            "vfio-pci is not loaded (modprobe vfio-pci)", bdf=gpu_bdf, driver=VFIO_PCI
        )
    recorded = {f.bdf: f for f in previous.functions} if previous else {}
    functions = [_original(sysfs, member.bdf, recorded.get(member.bdf)) for member in members]
    changed = False
    binding = GroupBinding(gpu_bdf=gpu_bdf, iommu_group=group, functions=functions, changed=False)
    for function in functions:
        try:
            changed = _bind_function(sysfs, function.bdf) or changed
        except DeviceError as error:
            raise DeviceError(
                f"binding {gpu_bdf}'s IOMMU group to vfio-pci failed at {function.bdf}: "
                f"{error.message}",
                **{
                    **error.fields,  # timed_out, errno, reason: why the write failed
                    "bdf": function.bdf,
                    "gpu_bdf": gpu_bdf,
                    "binding": binding.model_copy(update={"changed": True}).model_dump(),
                },
            ) from error
    return binding.model_copy(update={"changed": changed})


def release_group(sysfs: SysfsRoot, binding: GroupBinding) -> GroupRelease:
    """Return every function of ``binding`` to its original driver."""
    released = []
    changed = False
    for function in binding.functions:
        driver_before = sysfs.link_name(device_attr(function.bdf, "driver"))
        changed = _release_function(sysfs, function) or changed
        released.append(
            FunctionRelease(
                bdf=function.bdf,
                driver_before=driver_before,
                driver_after=sysfs.link_name(device_attr(function.bdf, "driver")),
            )
        )
    return GroupRelease(gpu_bdf=binding.gpu_bdf, functions=released, changed=changed)


def _original(sysfs: SysfsRoot, bdf: str, recorded: FunctionBinding | None) -> FunctionBinding:
    if recorded is not None:
        return recorded
    driver = sysfs.link_name(device_attr(bdf, "driver"))
    if driver == VFIO_PCI:
        return FunctionBinding(bdf=bdf, original_driver=None, original_known=False)
    return FunctionBinding(bdf=bdf, original_driver=driver)


def _bind_function(sysfs: SysfsRoot, bdf: str) -> bool:
    """Move one function to vfio-pci; True when anything was written."""
    device = read_pci_device(sysfs, bdf)
    if device.driver == VFIO_PCI and device.driver_override == VFIO_PCI:
        return False
    # The override goes first so nothing can probe the native driver back in meanwhile.
    if device.driver_override != VFIO_PCI:
        sysfs.write(device_attr(bdf, "driver_override"), VFIO_PCI)
    if device.driver is not None and device.driver != VFIO_PCI:
        sysfs.write(f"{PCI_DRIVERS}/{device.driver}/unbind", bdf)
    if sysfs.link_name(device_attr(bdf, "driver")) is None:
        sysfs.write(DRIVERS_PROBE, bdf)
    bound = sysfs.link_name(device_attr(bdf, "driver"))
    if bound != VFIO_PCI:
        raise DeviceError(
            f"{bdf} did not bind to vfio-pci: it is bound to {bound or 'no driver'}",
            bdf=bdf,
            driver=bound,
        )
    return True


def _release_function(sysfs: SysfsRoot, function: FunctionBinding) -> bool:
    """Return one function to its original driver; True when anything was written."""
    bdf = function.bdf
    device = read_pci_device(sysfs, bdf)
    wrote = False
    if device.driver_override == VFIO_PCI:
        sysfs.write(device_attr(bdf, "driver_override"), _CLEAR_OVERRIDE)
        wrote = True
    if device.driver == VFIO_PCI:
        sysfs.write(f"{PCI_DRIVERS}/{VFIO_PCI}/unbind", bdf)
        wrote = True
    driver = sysfs.link_name(device_attr(bdf, "driver"))
    wants_driver = function.original_driver is not None or not function.original_known
    if driver is None and wants_driver:
        sysfs.write(DRIVERS_PROBE, bdf)
        wrote = True
        driver = sysfs.link_name(device_attr(bdf, "driver"))
    if function.original_known and driver != function.original_driver:
        raise DeviceError(
            f"{bdf} is bound to {driver or 'no driver'} after release, "
            f"expected {function.original_driver or 'no driver'}",
            bdf=bdf,
            driver=driver,
            expected_driver=function.original_driver,
        )
    return wrote
