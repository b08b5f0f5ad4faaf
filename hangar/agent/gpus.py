"""The host's GPUs as the agent handles them: inventory into the GPU store, and the device
operations (bind, reset, release) the GPU steps call. Which GPUs a machine gets is the
scheduler's choice (``hangar.agent.placement``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hangar.devices import (
    GroupBinding,
    HostInventory,
    NoNvml,
    NvmlReader,
    PynvmlReader,
    SysfsRoot,
    bind_group_to_vfio,
    read_inventory,
    read_pci_device,
    release_group,
    reset_and_verify,
)
from hangar.devices.iommu import read_group_members
from hangar.devices.reset import ResetOutcome
from hangar.errors import DeviceError
from hangar.model.gpu import GpuRecord
from hangar.settings import Settings
from hangar.store.protocol import GpuStore

VFIO_PCI = "vfio-pci"


@dataclass
class HostGpus:
    """The devices of this host, read through one sysfs root (``/sys`` or a fixture tree)."""

    host_id: str
    sysfs: SysfsRoot
    nvml: NvmlReader = field(default_factory=lambda: NoNvml("NVML not used"))

    @classmethod
    def from_settings(cls, settings: Settings) -> HostGpus:
        root = settings.sysfs_root
        use_nvml = settings.nvml and root == Path("/sys")
        nvml: NvmlReader = PynvmlReader() if use_nvml else NoNvml("NVML off or fixture sysfs")
        return cls(host_id=settings.host_id, sysfs=SysfsRoot(root), nvml=nvml)

    def inventory(self) -> HostInventory:
        return read_inventory(self.sysfs, nvml=self.nvml)

    def register(self, store: GpuStore) -> list[GpuRecord]:
        """Record every GPU of the inventory in the store (claims and quarantine are kept)."""
        records = []
        for gpu in self.inventory().gpus:
            records.append(
                store.upsert_gpu_inventory(
                    GpuRecord(
                        host_id=self.host_id,
                        bdf=gpu.bdf,
                        kind=gpu.kind.name,
                        numa_node=gpu.numa_node,
                        nvlink_domain=gpu.nvlink_domain,
                        iommu_group=gpu.iommu_group,
                        available=gpu.available,
                        reason=gpu.unavailable_reason or "",
                    )
                )
            )
        return records

    def bind(self, bdf: str, previous: GroupBinding | None) -> GroupBinding:
        return bind_group_to_vfio(self.sysfs, bdf, previous)

    def current_drivers(self, bdf: str) -> dict[str, str | None]:
        device = read_pci_device(self.sysfs, bdf)
        drivers: dict[str, str | None] = {bdf: device.driver}
        if device.iommu_group is not None:
            for member in read_group_members(self.sysfs, device.iommu_group):
                drivers.setdefault(member.bdf, member.driver)
        return drivers

    def reset(self, bdf: str, binding: GroupBinding | None) -> ResetOutcome:
        expected: str | dict[str, str | None] = (
            VFIO_PCI if binding is not None else self.current_drivers(bdf)
        )
        return reset_and_verify(self.sysfs, bdf, expected_driver=expected)

    def restore_host_drivers(self, binding: GroupBinding) -> None:
        """Give the group back to the drivers it had before hangar took it, and check it."""
        release_group(self.sysfs, binding)
        wrong = [
            f"{function.bdf} is on {driver!r}, expected {function.original_driver!r}"
            for function in binding.functions
            if function.original_known
            and (driver := read_pci_device(self.sysfs, function.bdf).driver)
            != function.original_driver
        ]
        if wrong:
            raise DeviceError(
                f"GPU {binding.gpu_bdf} did not return to its host drivers: " + "; ".join(wrong),
                bdf=binding.gpu_bdf,
            )

    def on_vfio(self, bdfs: Sequence[str]) -> bool:
        return all(read_pci_device(self.sysfs, bdf).driver == VFIO_PCI for bdf in bdfs)
