"""IOMMU groups: which functions pass through together, and whether a GPU's group is clean.

VFIO hands a whole group to one guest. A GPU's group is clean when it holds only the GPU,
the other functions of the same card (HDMI audio, USB-C and UCSI controllers), other GPUs
(which then pass through together) and PCI bridges (which VFIO leaves on their driver).
Anything else, a NIC or a storage controller, would go to the tenant with the GPU.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from hangar.devices.pci import NVIDIA_VENDOR_ID, PciDevice, read_pci_device
from hangar.devices.sysfs import SysfsRoot
from hangar.errors import DeviceError

IOMMU_GROUPS = "kernel/iommu_groups"

# Base class and subclass of the functions a GPU card carries besides the GPU itself.
_COMPANION_CLASSES = frozenset({0x0403, 0x0C03, 0x0C80})

MemberRole = Literal["gpu", "companion", "bridge", "foreign"]
"""gpu and companion functions are bound to vfio-pci; bridges stay; foreign ones block."""


class GroupMember(BaseModel):
    model_config = ConfigDict(frozen=True)

    bdf: str
    pci_id: str
    class_name: str
    driver: str | None
    role: MemberRole

    @property
    def passes_through(self) -> bool:
        return self.role in ("gpu", "companion")

    def describe(self) -> str:
        driver = f"driver {self.driver}" if self.driver else "no driver"
        return f"{self.bdf} ({self.class_name} {self.pci_id}, {driver})"


def iommu_groups_present(sysfs: SysfsRoot) -> bool:
    return bool(sysfs.list_dir(IOMMU_GROUPS))


def group_bdfs(sysfs: SysfsRoot, group: int) -> list[str]:
    return sysfs.list_dir(f"{IOMMU_GROUPS}/{group}/devices")


def _is_gpu(device: PciDevice) -> bool:
    return device.vendor_id == NVIDIA_VENDOR_ID and device.is_display


def _role(device: PciDevice, gpu_slots: set[str]) -> MemberRole:
    if _is_gpu(device):
        return "gpu"
    if (
        device.vendor_id == NVIDIA_VENDOR_ID
        and device.slot in gpu_slots
        and device.class_code >> 8 in _COMPANION_CLASSES
    ):
        return "companion"
    if device.is_bridge:
        return "bridge"
    return "foreign"


def classify_functions(devices: list[PciDevice]) -> list[GroupMember]:
    """Give each function of one group its role."""
    gpu_slots = {device.slot for device in devices if _is_gpu(device)}
    return [
        GroupMember(
            bdf=device.bdf,
            pci_id=device.pci_id,
            class_name=device.class_name,
            driver=device.driver,
            role=_role(device, gpu_slots),
        )
        for device in sorted(devices, key=lambda device: device.bdf)
    ]


def read_group_members(sysfs: SysfsRoot, group: int) -> list[GroupMember]:
    """The group's functions with their roles; one that vanishes while being read is left out."""
    devices = []
    for bdf in group_bdfs(sysfs, group):
        try:
            devices.append(read_pci_device(sysfs, bdf))
        except DeviceError:
            continue
    return classify_functions(devices)


def group_problem(group: int, members: list[GroupMember]) -> str | None:
    """Why the group cannot go to a GPU machine, or None when it is clean."""
    foreign = [member.describe() for member in members if member.role == "foreign"]
    if not foreign:
        return None
    return f"IOMMU group {group} also holds " + ", ".join(foreign)


def passthrough_functions(sysfs: SysfsRoot, gpu_bdf: str) -> tuple[int, list[GroupMember]]:
    """The GPU's IOMMU group and the functions in it that must be bound with the GPU.

    DeviceError when the GPU has no IOMMU group or shares it with a foreign function.
    """
    gpu = read_pci_device(sysfs, gpu_bdf)
    if gpu.iommu_group is None:
        raise DeviceError(
            f"{gpu_bdf} has no IOMMU group: the IOMMU is off, VFIO cannot pass it through",
            bdf=gpu_bdf,
        )
    members = read_group_members(sysfs, gpu.iommu_group)
    problem = group_problem(gpu.iommu_group, members)
    if problem is not None:
        raise DeviceError(
            f"{gpu_bdf} cannot pass through: {problem}",
            bdf=gpu_bdf,
            iommu_group=gpu.iommu_group,
            foreign=[member.bdf for member in members if member.role == "foreign"],
        )
    return gpu.iommu_group, [member for member in members if member.passes_through]
