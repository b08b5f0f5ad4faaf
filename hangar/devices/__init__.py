"""Host devices for GPU machines: PCI inventory from sysfs, IOMMU groups, VFIO binding,
the handoff between tenants (scrub, staged settings, health) and NVML (UUIDs, MIG). The GPU
kinds hangar knows are vocabulary: ``hangar.model.gpu_kinds``.

Everything reads and writes sysfs through :class:`SysfsRoot`, so a fixture tree stands in
for ``/sys`` in tests; NVML is read through an :class:`NvmlReader`. Names are exported
lazily, so a device worker process (:mod:`hangar.devices.workerproc`) imports only what
its one operation needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hangar.devices.groups import GpuGroup, group_of, plan_group_claim, read_gpu_groups
    from hangar.devices.handoff import (
        GroupClaim,
        HandoffContext,
        HandoffReport,
        begin_claim,
        bind_claim,
        check_not_held,
        check_vm_released,
        run_handoff,
    )
    from hangar.devices.hostpaths import HostPaths
    from hangar.devices.inventory import (
        Gpu,
        HostInventory,
        NvmlStatus,
        NvSwitch,
        read_inventory,
    )
    from hangar.devices.nvml import (
        MigInstance,
        NoNvml,
        NvmlReader,
        NvmlReport,
        PynvmlReader,
    )
    from hangar.devices.pci import PciDevice, normalize_bdf, read_pci_device
    from hangar.devices.report import render_inspect_report
    from hangar.devices.reset import (
        ResetOutcome,
        Scrubber,
        VerifyOnlyScrubber,
        reset_and_verify,
        reset_guard,
    )
    from hangar.devices.scrub import CommandScrubber, ScrubOutcome, TrustedScrubber, scrub
    from hangar.devices.sysfs import FileWriter, ReadOnlyWriter, SysfsRoot, SysfsWriter
    from hangar.devices.vfio import (
        GroupBinding,
        GroupRelease,
        bind_group_to_vfio,
        release_group,
    )
    from hangar.devices.worker import DeviceDeadlines, WorkerRunner, killable_sysfs

_EXPORTS = {
    "groups": ["GpuGroup", "group_of", "plan_group_claim", "read_gpu_groups"],
    "handoff": [
        "GroupClaim",
        "HandoffContext",
        "HandoffReport",
        "begin_claim",
        "bind_claim",
        "check_not_held",
        "check_vm_released",
        "run_handoff",
    ],
    "hostpaths": ["HostPaths"],
    "inventory": ["Gpu", "HostInventory", "NvSwitch", "NvmlStatus", "read_inventory"],
    "nvml": ["MigInstance", "NoNvml", "NvmlReader", "NvmlReport", "PynvmlReader"],
    "pci": ["PciDevice", "normalize_bdf", "read_pci_device"],
    "report": ["render_inspect_report"],
    "reset": [
        "ResetOutcome",
        "Scrubber",
        "VerifyOnlyScrubber",
        "reset_and_verify",
        "reset_guard",
    ],
    "scrub": ["CommandScrubber", "ScrubOutcome", "TrustedScrubber", "scrub"],
    "sysfs": ["FileWriter", "ReadOnlyWriter", "SysfsRoot", "SysfsWriter"],
    "vfio": ["GroupBinding", "GroupRelease", "bind_group_to_vfio", "release_group"],
    "worker": ["DeviceDeadlines", "WorkerRunner", "killable_sysfs"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "CommandScrubber",
    "DeviceDeadlines",
    "FileWriter",
    "Gpu",
    "GpuGroup",
    "GroupBinding",
    "GroupClaim",
    "GroupRelease",
    "HandoffContext",
    "HandoffReport",
    "HostInventory",
    "HostPaths",
    "MigInstance",
    "NoNvml",
    "NvSwitch",
    "NvmlReader",
    "NvmlReport",
    "NvmlStatus",
    "PciDevice",
    "PynvmlReader",
    "ReadOnlyWriter",
    "ResetOutcome",
    "ScrubOutcome",
    "Scrubber",
    "SysfsRoot",
    "SysfsWriter",
    "TrustedScrubber",
    "VerifyOnlyScrubber",
    "WorkerRunner",
    "begin_claim",
    "bind_claim",
    "bind_group_to_vfio",
    "check_not_held",
    "check_vm_released",
    "group_of",
    "killable_sysfs",
    "normalize_bdf",
    "plan_group_claim",
    "read_gpu_groups",
    "read_inventory",
    "read_pci_device",
    "release_group",
    "render_inspect_report",
    "reset_and_verify",
    "reset_guard",
    "run_handoff",
    "scrub",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
