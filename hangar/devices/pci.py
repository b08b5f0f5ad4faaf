"""PCI functions as sysfs shows them under ``bus/pci/devices/<BDF>``."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from hangar.devices.sysfs import SysfsRoot
from hangar.errors import DeviceError

PCI_DEVICES = "bus/pci/devices"
PCI_DRIVERS = "bus/pci/drivers"
DRIVERS_PROBE = "bus/pci/drivers_probe"

NVIDIA_VENDOR_ID = 0x10DE

# Flags the kernel prints in the third column of ``resource`` (include/linux/ioport.h).
IORESOURCE_IO = 0x00000100
IORESOURCE_MEM = 0x00000200
IORESOURCE_PREFETCH = 0x00002000
IORESOURCE_MEM_64 = 0x00100000

ROM_RESOURCE_INDEX = 6

# Base class and subclass (upper 16 bits of the class code) -> the name lspci prints.
_CLASS_NAMES: dict[int, str] = {
    0x0104: "RAID bus controller",
    0x0106: "SATA controller",
    0x0107: "Serial Attached SCSI controller",
    0x0108: "Non-Volatile memory controller",
    0x0200: "Ethernet controller",
    0x0207: "Infiniband controller",
    0x0280: "Network controller",
    0x0300: "VGA compatible controller",
    0x0302: "3D controller",
    0x0380: "Display controller",
    0x0403: "Audio device",
    0x0600: "Host bridge",
    0x0604: "PCI bridge",
    0x0680: "Bridge",
    0x0C03: "USB controller",
    0x0C80: "Serial bus controller",
}

_BDF = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{2}):"
    r"(?P<device>[0-9a-fA-F]{2})\.(?P<function>[0-7])$"
)


def normalize_bdf(text: str) -> str:
    """``dddd:bb:dd.f`` in lower case from sysfs, lspci or NVML spellings.

    NVML writes the domain with eight digits (``00000000:3B:00.0``); sysfs with four.
    """
    match = _BDF.match(text.strip())
    if match is None:
        raise DeviceError(f"{text!r} is not a PCI address (domain:bus:device.function)", bdf=text)
    domain = int(match["domain"] or "0", 16)
    return f"{domain:04x}:{match['bus'].lower()}:{match['device'].lower()}.{match['function']}"


def class_name(class_code: int) -> str:
    return _CLASS_NAMES.get(class_code >> 8, f"class {class_code >> 8:04x}")


class PciBar(BaseModel):
    """One populated line of ``resource``: a BAR (index 0-5) or the expansion ROM (6)."""

    model_config = ConfigDict(frozen=True)

    index: int
    start: int
    size: int
    flags: int

    @property
    def is_io(self) -> bool:
        return bool(self.flags & IORESOURCE_IO)

    @property
    def prefetchable(self) -> bool:
        return bool(self.flags & IORESOURCE_PREFETCH)

    @property
    def is_64bit(self) -> bool:
        return bool(self.flags & IORESOURCE_MEM_64)

    @property
    def is_rom(self) -> bool:
        return self.index == ROM_RESOURCE_INDEX


class PciDevice(BaseModel):
    """A PCI function. Ids are integers; ``pci_id`` gives the ``vvvv:dddd`` spelling."""

    model_config = ConfigDict(frozen=True)

    bdf: str
    vendor_id: int
    device_id: int
    class_code: int
    subsystem_vendor_id: int | None = None
    subsystem_device_id: int | None = None
    numa_node: int | None = None
    """None when the kernel reports no affinity (-1) or has no NUMA support."""
    iommu_group: int | None = None
    driver: str | None = None
    driver_override: str | None = None
    reset_methods: list[str] | None = None
    """What ``reset_method`` lists, in the kernel's order; None when the kernel lacks it."""
    bars: list[PciBar] = []
    sysfs_path: str = ""
    """The device directory relative to the sysfs root (``devices/pci0000:00/...``)."""

    @property
    def pci_id(self) -> str:
        return f"{self.vendor_id:04x}:{self.device_id:04x}"

    @property
    def slot(self) -> str:
        """The address without the function: functions of one device share it."""
        return self.bdf.rsplit(".", 1)[0]

    @property
    def class_name(self) -> str:
        return class_name(self.class_code)

    @property
    def is_bridge(self) -> bool:
        return self.class_code >> 8 == 0x0604

    @property
    def is_display(self) -> bool:
        return self.class_code >> 16 == 0x03


def device_attr(bdf: str, attribute: str) -> str:
    return f"{PCI_DEVICES}/{bdf}/{attribute}"


def list_bdfs(sysfs: SysfsRoot) -> list[str]:
    return sysfs.list_dir(PCI_DEVICES)


def read_pci_device(sysfs: SysfsRoot, bdf: str) -> PciDevice:
    """Read one function; DeviceError when it is absent or its ids cannot be read."""
    vendor = _hex(sysfs.read_text(device_attr(bdf, "vendor")))
    device = _hex(sysfs.read_text(device_attr(bdf, "device")))
    pci_class = _hex(sysfs.read_text(device_attr(bdf, "class")))
    if vendor is None or device is None or pci_class is None:
        raise DeviceError(f"PCI device {bdf} is not present in {sysfs.root}", bdf=bdf)
    override = sysfs.read_text(device_attr(bdf, "driver_override"))
    reset_methods = sysfs.read_text(device_attr(bdf, "reset_method"))
    group = sysfs.link_name(device_attr(bdf, "iommu_group"))
    return PciDevice(
        bdf=bdf,
        vendor_id=vendor,
        device_id=device,
        class_code=pci_class,
        subsystem_vendor_id=_hex(sysfs.read_text(device_attr(bdf, "subsystem_vendor"))),
        subsystem_device_id=_hex(sysfs.read_text(device_attr(bdf, "subsystem_device"))),
        numa_node=_numa_node(sysfs.read_text(device_attr(bdf, "numa_node"))),
        iommu_group=int(group) if group is not None and group.isdigit() else None,
        driver=sysfs.link_name(device_attr(bdf, "driver")),
        driver_override=None if override in (None, "", "(null)") else override,
        reset_methods=None if reset_methods is None else reset_methods.split(),
        bars=parse_resource(sysfs.read_text(device_attr(bdf, "resource")) or ""),
        sysfs_path=sysfs.real_relpath(f"{PCI_DEVICES}/{bdf}"),
    )


def list_pci_devices(sysfs: SysfsRoot) -> list[PciDevice]:
    """Every function under ``bus/pci/devices``; one that vanishes while being read is left out."""
    devices = []
    for bdf in list_bdfs(sysfs):
        try:
            devices.append(read_pci_device(sysfs, bdf))
        except DeviceError:
            continue
    return devices


def parse_resource(text: str) -> list[PciBar]:
    """BARs and ROM from ``resource``: one ``start end flags`` line per resource index."""
    bars = []
    for index, line in enumerate(text.splitlines()[: ROM_RESOURCE_INDEX + 1]):
        fields = line.split()
        if len(fields) != 3:
            continue
        start, end, flags = (int(field, 16) for field in fields)
        if start == 0 and end == 0:
            continue
        bars.append(PciBar(index=index, start=start, size=end - start + 1, flags=flags))
    return bars


def _hex(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def _numa_node(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        node = int(text)
    except ValueError:
        return None
    return node if node >= 0 else None
