"""Builds sysfs trees laid out as the kernel lays them out, for hosts the tests need.

Device directories live under ``devices/pci<domain>:<bus>/<bridges...>/<BDF>``;
``bus/pci/devices/<BDF>`` links to them, ``driver`` links to ``bus/pci/drivers/<name>``
(which links back), and ``iommu_group`` links to ``kernel/iommu_groups/<N>``, whose
``devices/`` links to each member. All links are relative, as in the real tree, so a
fixture can be moved and read through any root.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

NVIDIA = 0x10DE
MELLANOX = 0x15B3
INTEL = 0x8086
BROADCOM_PLX = 0x1000

CLASS_3D = 0x030200
CLASS_VGA = 0x030000
CLASS_AUDIO = 0x040300
CLASS_BRIDGE_OTHER = 0x068000
CLASS_PCI_BRIDGE = 0x060400
CLASS_ETHERNET = 0x020000
CLASS_NVME = 0x010802

GIB = 1024**3
MIB = 1024**2

# ``resource`` flags as the kernel prints them for NVIDIA GPU BARs.
BAR_MEM32 = 0x00040200
BAR_MEM64_PREFETCH = 0x0014220C

_RESOURCE_LINES = 13  # 6 BARs, the ROM, 6 SR-IOV BARs: what an endpoint shows


@dataclass(frozen=True)
class Bar:
    index: int
    start: int
    size: int
    flags: int


def gpu_bars(base: int, bar1_size: int) -> list[Bar]:
    """BAR0 (registers), BAR1 (framebuffer aperture), BAR3: NVIDIA's usual three."""
    return [
        Bar(0, base, 16 * MIB, BAR_MEM32),
        Bar(1, 0x200000000000 + base * 0x1000, bar1_size, BAR_MEM64_PREFETCH),
        Bar(3, 0x300000000000 + base * 0x1000, 32 * MIB, BAR_MEM64_PREFETCH),
    ]


class SysfsBuilder:
    def __init__(self, root: Path) -> None:
        self.root = root
        for folder in ("bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "devices"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        for attribute in ("drivers_probe", "rescan", "drivers_autoprobe"):
            (root / "bus/pci" / attribute).touch()

    def add_driver(self, name: str) -> None:
        driver = self.root / "bus/pci/drivers" / name
        driver.mkdir(exist_ok=True)
        for attribute in ("bind", "unbind", "new_id", "remove_id", "uevent"):
            (driver / attribute).touch()

    def add_device(
        self,
        bdf: str,
        *,
        vendor: int,
        device: int,
        class_code: int,
        parent: str | None = None,
        subsystem: tuple[int, int] | None = None,
        numa_node: int = -1,
        driver: str | None = None,
        iommu_group: int | None = None,
        reset_methods: list[str] | None = None,
        bars: list[Bar] | None = None,
    ) -> str:
        """Create one function; returns its path under ``devices/`` for children to use."""
        parent = parent or f"pci{bdf[:7]}"
        device_path = f"{parent}/{bdf}"
        folder = self.root / "devices" / device_path
        folder.mkdir(parents=True)
        sub_vendor, sub_device = subsystem or (vendor, device)
        attributes = {
            "vendor": f"0x{vendor:04x}",
            "device": f"0x{device:04x}",
            "class": f"0x{class_code:06x}",
            "subsystem_vendor": f"0x{sub_vendor:04x}",
            "subsystem_device": f"0x{sub_device:04x}",
            "numa_node": str(numa_node),
            "driver_override": "(null)",
            "resource": _resource(bars or []),
            "enable": "1",
        }
        for name, value in attributes.items():
            (folder / name).write_text(value + "\n")
        if reset_methods is not None:
            (folder / "reset_method").write_text(" ".join(reset_methods) + "\n")
        (folder / "reset").touch()
        (folder / "remove").touch()
        (folder / "config").write_bytes(
            _config_space(vendor, device, class_code, sub_vendor, sub_device)
        )
        _link(self.root / "bus/pci/devices" / bdf, folder)
        if driver is not None:
            self.bind(bdf, driver)
        if iommu_group is not None:
            group = self.root / "kernel/iommu_groups" / str(iommu_group)
            (group / "devices").mkdir(parents=True, exist_ok=True)
            (group / "type").write_text("DMA\n")
            _link(group / "devices" / bdf, folder)
            _link(folder / "iommu_group", group)
        return device_path

    def bind(self, bdf: str, driver: str) -> None:
        """Make the tree show ``bdf`` bound to ``driver``, as the kernel would."""
        self.add_driver(driver)
        folder = (self.root / "bus/pci/devices" / bdf).resolve()
        driver_folder = self.root / "bus/pci/drivers" / driver
        _link(folder / "driver", driver_folder)
        _link(driver_folder / bdf, folder)

    def unbind(self, bdf: str) -> None:
        folder = (self.root / "bus/pci/devices" / bdf).resolve()
        driver_link = folder / "driver"
        if driver_link.is_symlink():
            driver = Path(os.readlink(driver_link)).name
            (self.root / "bus/pci/drivers" / driver / bdf).unlink(missing_ok=True)
            driver_link.unlink()

    def remove(self, bdf: str) -> None:
        """Take the function off the bus, as hot removal (or a dead device) does."""
        self.unbind(bdf)
        link = self.root / "bus/pci/devices" / bdf
        folder = link.resolve()
        group = folder / "iommu_group"
        if group.is_symlink():
            (group.resolve() / "devices" / bdf).unlink()
        link.unlink()
        shutil.rmtree(folder)

    def add_bridge(
        self,
        bdf: str,
        *,
        parent: str | None = None,
        numa_node: int = -1,
        iommu_group: int | None = None,
        vendor: int = INTEL,
        device: int = 0x347A,
    ) -> str:
        return self.add_device(
            bdf,
            vendor=vendor,
            device=device,
            class_code=CLASS_PCI_BRIDGE,
            parent=parent,
            numa_node=numa_node,
            driver="pcieport",
            iommu_group=iommu_group,
            reset_methods=[],
        )


def _link(link: Path, target: Path) -> None:
    link.symlink_to(os.path.relpath(target, link.parent))


def _resource(bars: list[Bar]) -> str:
    lines = []
    by_index = {bar.index: bar for bar in bars}
    for index in range(_RESOURCE_LINES):
        bar = by_index.get(index)
        if bar is None:
            lines.append(f"0x{0:016x} 0x{0:016x} 0x{0:016x}")
        else:
            lines.append(f"0x{bar.start:016x} 0x{bar.start + bar.size - 1:016x} 0x{bar.flags:016x}")
    return "\n".join(lines)


def _config_space(
    vendor: int, device: int, class_code: int, sub_vendor: int, sub_device: int
) -> bytes:
    config = bytearray(256)
    config[0:2] = vendor.to_bytes(2, "little")
    config[2:4] = device.to_bytes(2, "little")
    config[4:6] = (0x0406).to_bytes(2, "little")  # command: memory space, bus master
    config[6:8] = (0x0010).to_bytes(2, "little")  # status: capability list
    config[8] = 0xA1  # revision
    config[9:12] = class_code.to_bytes(3, "little")
    config[0x0E] = 0x01 if class_code >> 8 == 0x0604 else 0x00
    config[0x2C:0x2E] = sub_vendor.to_bytes(2, "little")
    config[0x2E:0x30] = sub_device.to_bytes(2, "little")
    return bytes(config)


# --- hosts -----------------------------------------------------------------------------

HGX_H100_GPUS = {
    # BDF: NUMA node
    "0000:18:00.0": 0,
    "0000:2a:00.0": 0,
    "0000:3a:00.0": 0,
    "0000:5d:00.0": 0,
    "0000:9a:00.0": 1,
    "0000:ab:00.0": 1,
    "0000:ba:00.0": 1,
    "0000:db:00.0": 1,
}
HGX_H100_NVSWITCHES = ["0000:05:00.0", "0000:06:00.0", "0000:07:00.0", "0000:08:00.0"]
HGX_H100_NIC = "0000:c5:00.0"


def build_hgx_h100(root: Path) -> SysfsBuilder:
    """8x H100 SXM behind PCIe switches, 4 NVSwitches, a ConnectX NIC, two NUMA nodes.

    Each GPU sits below a switch downstream port with ACS, so it has a group of its own.
    """
    sysfs = SysfsBuilder(root)
    group = 10
    for bdf, node in HGX_H100_GPUS.items():
        bus = int(bdf[5:7], 16)
        root_bus = bus - 3
        root_port = sysfs.add_bridge(f"0000:{root_bus:02x}:01.0", numa_node=node, iommu_group=group)
        upstream = sysfs.add_bridge(
            f"0000:{root_bus + 1:02x}:00.0",
            parent=root_port,
            numa_node=node,
            iommu_group=group + 1,
            vendor=BROADCOM_PLX,
            device=0xC030,
        )
        downstream = sysfs.add_bridge(
            f"0000:{root_bus + 2:02x}:00.0",
            parent=upstream,
            numa_node=node,
            iommu_group=group + 2,
            vendor=BROADCOM_PLX,
            device=0xC030,
        )
        sysfs.add_device(
            bdf,
            vendor=NVIDIA,
            device=0x2330,
            class_code=CLASS_3D,
            parent=downstream,
            subsystem=(NVIDIA, 0x16C1),
            numa_node=node,
            driver="nvidia",
            iommu_group=group + 3,
            reset_methods=["flr", "bus"],
            bars=gpu_bars(0xE0000000 + bus * 0x100000, 128 * GIB),
        )
        group += 4
    switch_root = sysfs.add_bridge("0000:04:01.0", numa_node=0, iommu_group=group)
    for offset, bdf in enumerate(HGX_H100_NVSWITCHES):
        sysfs.add_device(
            bdf,
            vendor=NVIDIA,
            device=0x22A3,
            class_code=CLASS_BRIDGE_OTHER,
            parent=switch_root,
            numa_node=0,
            driver="nvidia",
            iommu_group=group + 1 + offset,
            reset_methods=["flr"],
            bars=[Bar(0, 0xD0000000 + offset * 0x2000000, 32 * MIB, BAR_MEM32)],
        )
    sysfs.add_device(
        HGX_H100_NIC,
        vendor=MELLANOX,
        device=0x1021,
        class_code=CLASS_ETHERNET,
        numa_node=1,
        driver="mlx5_core",
        iommu_group=group + 10,
        reset_methods=["flr", "bus"],
        bars=[Bar(0, 0x38000000000, 32 * MIB, BAR_MEM64_PREFETCH)],
    )
    sysfs.add_driver("vfio-pci")
    return sysfs


L40S_GPUS = {"0000:01:00.0": 0, "0000:41:00.0": 0, "0000:81:00.0": 1, "0000:c1:00.0": 1}


def build_l40s(root: Path) -> SysfsBuilder:
    """4x L40S PCIe cards, one per root port, each in its own group."""
    sysfs = SysfsBuilder(root)
    for group, (bdf, node) in enumerate(L40S_GPUS.items(), start=20):
        bus = int(bdf[5:7], 16)
        port = sysfs.add_bridge(
            f"0000:{bus - 1 if bus else 0:02x}:01.1", numa_node=node, iommu_group=group + 100
        )
        sysfs.add_device(
            bdf,
            vendor=NVIDIA,
            device=0x26B9,
            class_code=CLASS_3D,
            parent=port,
            subsystem=(NVIDIA, 0x1851),
            numa_node=node,
            driver="nvidia",
            iommu_group=group,
            reset_methods=["flr", "bus"],
            bars=gpu_bars(0xF0000000 + bus * 0x100000, 64 * GIB),
        )
    sysfs.add_driver("vfio-pci")
    return sysfs


A10_GPU = "0000:3b:00.0"
A10_AUDIO = "0000:3b:00.1"


def build_a10_with_audio(root: Path) -> SysfsBuilder:
    """An A10 whose HDMI audio function shares its IOMMU group (they pass through together)."""
    sysfs = SysfsBuilder(root)
    port = sysfs.add_bridge("0000:3a:00.0", numa_node=0, iommu_group=29)
    sysfs.add_device(
        A10_GPU,
        vendor=NVIDIA,
        device=0x2236,
        class_code=CLASS_VGA,
        parent=port,
        subsystem=(NVIDIA, 0x1482),
        numa_node=0,
        driver="nvidia",
        iommu_group=30,
        reset_methods=["flr", "bus"],
        bars=gpu_bars(0xF4000000, 32 * GIB),
    )
    sysfs.add_device(
        A10_AUDIO,
        vendor=NVIDIA,
        device=0x1AEF,
        class_code=CLASS_AUDIO,
        parent=port,
        subsystem=(NVIDIA, 0x1482),
        numa_node=0,
        driver="snd_hda_intel",
        iommu_group=30,
        reset_methods=["flr"],
        bars=[Bar(0, 0xF5080000, 16 * 1024, BAR_MEM32)],
    )
    sysfs.add_driver("vfio-pci")
    return sysfs


SHARED_GPU = "0000:04:00.0"
SHARED_NIC = "0000:05:00.0"


def build_gpu_sharing_group_with_nic(root: Path) -> SysfsBuilder:
    """An A100 PCIe and an Intel NIC behind one switch without ACS: one IOMMU group."""
    sysfs = SysfsBuilder(root)
    port = sysfs.add_bridge("0000:00:1c.0", numa_node=0, iommu_group=14)
    upstream = sysfs.add_bridge(
        "0000:02:00.0",
        parent=port,
        numa_node=0,
        iommu_group=15,
        vendor=BROADCOM_PLX,
        device=0x8747,
    )
    gpu_port = sysfs.add_bridge(
        "0000:03:08.0",
        parent=upstream,
        numa_node=0,
        iommu_group=15,
        vendor=BROADCOM_PLX,
        device=0x8747,
    )
    nic_port = sysfs.add_bridge(
        "0000:03:10.0",
        parent=upstream,
        numa_node=0,
        iommu_group=15,
        vendor=BROADCOM_PLX,
        device=0x8747,
    )
    sysfs.add_device(
        SHARED_GPU,
        vendor=NVIDIA,
        device=0x20F1,
        class_code=CLASS_3D,
        parent=gpu_port,
        numa_node=0,
        driver="nvidia",
        iommu_group=15,
        reset_methods=["flr", "bus"],
        bars=gpu_bars(0xF6000000, 64 * GIB),
    )
    sysfs.add_device(
        SHARED_NIC,
        vendor=INTEL,
        device=0x1521,
        class_code=CLASS_ETHERNET,
        parent=nic_port,
        numa_node=0,
        driver="igb",
        iommu_group=15,
        reset_methods=["flr", "bus"],
        bars=[Bar(0, 0xF7000000, 1 * MIB, BAR_MEM32)],
    )
    sysfs.add_driver("vfio-pci")
    return sysfs


NO_IOMMU_GPU = "0000:01:00.0"


def build_without_iommu(root: Path) -> SysfsBuilder:
    """An H100 PCIe on a host booted without an IOMMU: no groups anywhere."""
    sysfs = SysfsBuilder(root)
    port = sysfs.add_bridge("0000:00:01.0", numa_node=0)
    sysfs.add_device(
        NO_IOMMU_GPU,
        vendor=NVIDIA,
        device=0x2331,
        class_code=CLASS_3D,
        parent=port,
        numa_node=0,
        driver="nvidia",
        reset_methods=["flr", "bus"],
        bars=gpu_bars(0xF8000000, 128 * GIB),
    )
    sysfs.add_driver("vfio-pci")
    return sysfs


def build_without_gpu(root: Path) -> SysfsBuilder:
    """A CPU host: a NIC and an NVMe drive, nothing from NVIDIA."""
    sysfs = SysfsBuilder(root)
    sysfs.add_device(
        "0000:00:03.0",
        vendor=INTEL,
        device=0x1521,
        class_code=CLASS_ETHERNET,
        driver="igb",
        iommu_group=3,
        reset_methods=["flr"],
    )
    sysfs.add_device(
        "0000:00:04.0",
        vendor=0x144D,
        device=0xA80A,
        class_code=CLASS_NVME,
        driver="nvme",
        iommu_group=4,
        reset_methods=["flr"],
    )
    return sysfs


FIRECRACKER_H200 = "0000:00:05.0"


def build_firecracker_h200(root: Path) -> SysfsBuilder:
    """A Firecracker guest with one H200 passed through: flat root bus, no NUMA, no IOMMU."""
    sysfs = SysfsBuilder(root)
    sysfs.add_device("0000:00:00.0", vendor=INTEL, device=0x0D57, class_code=0x060000)
    for slot in (1, 2, 3, 4):
        sysfs.add_device(
            f"0000:00:{slot:02x}.0",
            vendor=0x1AF4,
            device=0x1042,
            class_code=0x018000,
            driver="virtio-pci",
            bars=[Bar(0, 0x4000000000 + slot * 0x80000, 0x80000, 0x140204)],
        )
    sysfs.add_device(
        FIRECRACKER_H200,
        vendor=NVIDIA,
        device=0x2335,
        class_code=CLASS_3D,
        subsystem=(NVIDIA, 0x18BE),
        driver="nvidia",
        reset_methods=["flr", "bus"],
        bars=gpu_bars(0xE0000000, 256 * GIB),
    )
    return sysfs
