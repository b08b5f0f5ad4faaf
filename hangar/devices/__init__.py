"""Host devices for GPU machines: PCI inventory from sysfs, IOMMU groups, VFIO binding,
reset between tenants, NVML (UUIDs, MIG) and the GPU kind catalog.

Everything reads and writes sysfs through :class:`SysfsRoot`, so a fixture tree stands in
for ``/sys`` in tests; NVML is read through an :class:`NvmlReader`.
"""

from hangar.devices.catalog import GPU_KINDS, GpuKind, gpu_kind_for_device_id, gpu_kind_named
from hangar.devices.inventory import Gpu, HostInventory, NvmlStatus, NvSwitch, read_inventory
from hangar.devices.nvml import MigInstance, NoNvml, NvmlReader, NvmlReport, PynvmlReader
from hangar.devices.pci import PciDevice, normalize_bdf, read_pci_device
from hangar.devices.report import render_inspect_report
from hangar.devices.reset import ResetOutcome, Scrubber, VerifyOnlyScrubber, reset_and_verify
from hangar.devices.sysfs import FileWriter, ReadOnlyWriter, SysfsRoot, SysfsWriter
from hangar.devices.vfio import GroupBinding, GroupRelease, bind_group_to_vfio, release_group

__all__ = [
    "GPU_KINDS",
    "FileWriter",
    "Gpu",
    "GpuKind",
    "GroupBinding",
    "GroupRelease",
    "HostInventory",
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
    "Scrubber",
    "SysfsRoot",
    "SysfsWriter",
    "VerifyOnlyScrubber",
    "bind_group_to_vfio",
    "gpu_kind_for_device_id",
    "gpu_kind_named",
    "normalize_bdf",
    "read_inventory",
    "read_pci_device",
    "release_group",
    "render_inspect_report",
    "reset_and_verify",
]
