"""Builds sysfs trees laid out as the kernel lays them out, for hosts the tests need.

Device directories live under ``devices/pci<domain>:<bus>/<bridges...>/<BDF>``;
``bus/pci/devices/<BDF>`` links to them, ``driver`` links to ``bus/pci/drivers/<name>``
(which links back), and ``iommu_group`` links to ``kernel/iommu_groups/<N>``, whose
``devices/`` links to each member. All links are relative, as in the real tree, so a
fixture can be moved and read through any root.

A tree rooted at a folder named ``sys`` is a whole fixture host: its siblings ``dev`` and
``proc`` hold what a VFIO-ready host has there (``/dev/vfio/vfio``, interrupts on
``IR-`` chips) and what the nvidia driver adds for each GPU it holds
(``/proc/driver/nvidia/gpus/<BDF>/information``). Processes that hold device nodes open
are ``proc/<pid>/fd`` links (:meth:`SysfsBuilder.add_holder`). PCIe functions carry link
speed and width and AER counters; GPUs a sparse ``resource0`` (BAR0) for register reads.
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

GEN5 = "32.0 GT/s PCIe"
GEN4 = "16.0 GT/s PCIe"
GEN1 = "2.5 GT/s PCIe"
AER_CORRECTABLE = ("RxErr", "BadTLP", "BadDLLP", "Rollover", "Timeout", "NonFatalErr")
AER_UNCORRECTABLE = ("Undefined", "DLP", "SDES", "TLP", "FCP", "CmpltTO", "UnxCmplt", "MalfTLP")
INTERRUPTS = (
    "            CPU0       CPU1\n"
    "   0:         41          0   IO-APIC   2-edge      timer\n"
    "   9:          0          0   IR-IO-APIC    9-fasteoi   acpi\n"
    " 120:         11          0   IR-PCI-MSI 524288-edge      nvme0q0\n"
    " DMAR:          0          0   Intel DMAR remapping faults\n"
)
INTERRUPTS_WITHOUT_REMAPPING = (
    "            CPU0       CPU1\n"
    "   0:         41          0   IO-APIC   2-edge      timer\n"
    " 120:         11          0   PCI-MSI 524288-edge      nvme0q0\n"
)


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
    def __init__(self, root: Path, *, reset_subordinate: bool = False) -> None:
        """``reset_subordinate``: bridges offer it, as on Linux 6.14 and later."""
        self.root = root
        self.reset_subordinate = reset_subordinate
        for folder in ("bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "devices"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        for attribute in ("drivers_probe", "rescan", "drivers_autoprobe"):
            (root / "bus/pci" / attribute).touch()
        self.host = root.parent if root.name == "sys" else None
        """The fixture host's folder, holding ``sys``, ``dev`` and ``proc``."""
        if self.host is not None and not (self.host / "proc").exists():
            (self.host / "dev/vfio").mkdir(parents=True)
            (self.host / "dev/vfio/vfio").touch()
            (self.host / "proc/driver/nvidia/gpus").mkdir(parents=True)
            (self.host / "proc/interrupts").write_text(INTERRUPTS)
            params = root / "module/vfio_iommu_type1/parameters"
            params.mkdir(parents=True)
            (params / "allow_unsafe_interrupts").write_text("N\n")

    @property
    def proc(self) -> Path:
        assert self.host is not None, "a fixture host's sysfs root is named 'sys'"
        return self.host / "proc"

    def add_holder(self, pid: int, command: str, *nodes: str) -> None:
        """A process holding ``nodes`` open (``/dev/nvidia0``), as ``/proc/PID`` shows it."""
        folder = self.proc / str(pid)
        (folder / "fd").mkdir(parents=True, exist_ok=True)
        (folder / "comm").write_text(command + "\n")
        for fd, node in enumerate(nodes, start=3):
            (folder / "fd" / str(fd)).symlink_to(node)
        (folder / "fd" / "0").symlink_to("/dev/null")

    def remove_holder(self, pid: int) -> None:
        shutil.rmtree(self.proc / str(pid))

    def device_dir(self, bdf: str) -> Path:
        return (self.root / "bus/pci/devices" / bdf).resolve()

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
        link: tuple[str, int] | None = (GEN5, 16),
        max_link: tuple[str, int] | None = None,
    ) -> str:
        """Create one function; returns its path under ``devices/`` for children to use.

        ``link`` is its current PCIe link (speed, width), ``max_link`` what it is capable
        of (default: the same); None for a function with no PCIe capability."""
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
        if link is not None:
            self.set_link(folder, link, max_link or link)
            for name, kinds in (
                ("aer_dev_correctable", AER_CORRECTABLE),
                ("aer_dev_nonfatal", AER_UNCORRECTABLE),
                ("aer_dev_fatal", AER_UNCORRECTABLE),
            ):
                (folder / name).write_text(_aer(name, dict.fromkeys(kinds, 0)))
        if class_code == CLASS_PCI_BRIDGE and self.reset_subordinate:
            (folder / "reset_subordinate").touch()
        if vendor == NVIDIA and class_code >> 16 == 0x03 and bars:
            with open(folder / "resource0", "wb") as bar0:
                bar0.truncate(bars[0].size)
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

    def set_link(self, folder: Path, link: tuple[str, int], max_link: tuple[str, int]) -> None:
        (folder / "current_link_speed").write_text(link[0] + "\n")
        (folder / "current_link_width").write_text(f"{link[1]}\n")
        (folder / "max_link_speed").write_text(max_link[0] + "\n")
        (folder / "max_link_width").write_text(f"{max_link[1]}\n")

    def set_aer(self, bdf: str, name: str, **counts: int) -> None:
        """Set AER counters of ``aer_dev_correctable``/``_nonfatal``/``_fatal``."""
        path = self.device_dir(bdf) / name
        current = {
            line.split()[0]: int(line.split()[1])
            for line in path.read_text().splitlines()
            if not line.startswith("TOTAL_")
        }
        current.update(counts)
        path.write_text(_aer(name, current))

    def bind(self, bdf: str, driver: str) -> None:
        """Make the tree show ``bdf`` bound to ``driver``, as the kernel would; the nvidia
        driver also lists a GPU it takes in ``/proc/driver/nvidia/gpus``."""
        self.add_driver(driver)
        folder = (self.root / "bus/pci/devices" / bdf).resolve()
        driver_folder = self.root / "bus/pci/drivers" / driver
        _link(folder / "driver", driver_folder)
        _link(driver_folder / bdf, folder)
        is_gpu = int((folder / "class").read_text(), 16) >> 16 == 0x03
        if driver == "nvidia" and is_gpu and self.host is not None:
            gpus = self.proc / "driver/nvidia/gpus"
            taken = {
                int(line.split(":")[1])
                for info in gpus.glob("*/information")
                for line in info.read_text().splitlines()
                if line.startswith("Device Minor")
            }
            minor = min(set(range(len(taken) + 1)) - taken)
            (gpus / bdf).mkdir(exist_ok=True)
            (gpus / bdf / "information").write_text(
                f"Model: \t\t NVIDIA GPU\nBus Location: \t {bdf}\nDevice Minor: \t {minor}\n"
            )

    def unbind(self, bdf: str) -> None:
        folder = (self.root / "bus/pci/devices" / bdf).resolve()
        driver_link = folder / "driver"
        if driver_link.is_symlink():
            driver = Path(os.readlink(driver_link)).name
            (self.root / "bus/pci/drivers" / driver / bdf).unlink(missing_ok=True)
            driver_link.unlink()
            if driver == "nvidia" and self.host is not None:
                shutil.rmtree(self.proc / "driver/nvidia/gpus" / bdf, ignore_errors=True)

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


def _aer(name: str, counts: dict[str, int]) -> str:
    total = {
        "aer_dev_correctable": "TOTAL_ERR_COR",
        "aer_dev_nonfatal": "TOTAL_ERR_NONFATAL",
        "aer_dev_fatal": "TOTAL_ERR_FATAL",
    }[name]
    lines = [f"{kind} {count}" for kind, count in counts.items()]
    return "\n".join([*lines, f"{total} {sum(counts.values())}"]) + "\n"


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


def build_hgx_h100(root: Path, *, reset_subordinate: bool = False) -> SysfsBuilder:
    """8x H100 SXM behind PCIe switches, 4 NVSwitches, a ConnectX NIC, two NUMA nodes.

    Each GPU sits below a switch downstream port with ACS, so it has a group of its own.
    """
    sysfs = SysfsBuilder(root, reset_subordinate=reset_subordinate)
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


def build_l40s(root: Path, *, reset_subordinate: bool = False) -> SysfsBuilder:
    """4x L40S PCIe cards, one per root port, each in its own group."""
    sysfs = SysfsBuilder(root, reset_subordinate=reset_subordinate)
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


def build_a10_with_audio(root: Path, *, reset_subordinate: bool = False) -> SysfsBuilder:
    """An A10 whose HDMI audio function shares its IOMMU group (they pass through together)."""
    sysfs = SysfsBuilder(root, reset_subordinate=reset_subordinate)
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


def build_gpu_sharing_group_with_nic(
    root: Path, *, reset_subordinate: bool = False
) -> SysfsBuilder:
    """An A100 PCIe and an Intel NIC behind one switch without ACS: one IOMMU group."""
    sysfs = SysfsBuilder(root, reset_subordinate=reset_subordinate)
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


def build_without_iommu(root: Path, *, reset_subordinate: bool = False) -> SysfsBuilder:
    """An H100 PCIe on a host booted without an IOMMU: no groups anywhere."""
    sysfs = SysfsBuilder(root, reset_subordinate=reset_subordinate)
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


def build_without_gpu(root: Path, *, reset_subordinate: bool = False) -> SysfsBuilder:
    """A CPU host: a NIC and an NVMe drive, nothing from NVIDIA."""
    sysfs = SysfsBuilder(root, reset_subordinate=reset_subordinate)
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


def build_firecracker_h200(root: Path, *, reset_subordinate: bool = False) -> SysfsBuilder:
    """A Firecracker guest with one H200 passed through: flat root bus, no NUMA, no IOMMU."""
    sysfs = SysfsBuilder(root, reset_subordinate=reset_subordinate)
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


TWIN_GPUS = ["0000:43:00.0", "0000:44:00.0"]
TWIN_GROUP = 50


def build_two_gpus_one_group(root: Path, *, reset_subordinate: bool = False) -> SysfsBuilder:
    """Two L40S cards behind one PCIe switch without ACS: the switch's ports and both GPUs
    share IOMMU group 50, so the two GPUs can only go to one tenant together."""
    sysfs = SysfsBuilder(root, reset_subordinate=reset_subordinate)
    root_port = sysfs.add_bridge("0000:40:01.0", numa_node=0, iommu_group=49)
    upstream = sysfs.add_bridge(
        "0000:41:00.0",
        parent=root_port,
        numa_node=0,
        iommu_group=TWIN_GROUP,
        vendor=BROADCOM_PLX,
        device=0x8747,
    )
    for port, bdf in zip(("0000:42:08.0", "0000:42:10.0"), TWIN_GPUS, strict=True):
        downstream = sysfs.add_bridge(
            port,
            parent=upstream,
            numa_node=0,
            iommu_group=TWIN_GROUP,
            vendor=BROADCOM_PLX,
            device=0x8747,
        )
        sysfs.add_device(
            bdf,
            vendor=NVIDIA,
            device=0x26B9,
            class_code=CLASS_3D,
            parent=downstream,
            numa_node=0,
            driver="nvidia",
            iommu_group=TWIN_GROUP,
            reset_methods=["flr", "bus"],
            bars=gpu_bars(0xF0000000 + int(bdf[5:7], 16) * 0x100000, 64 * GIB),
        )
    sysfs.add_driver("vfio-pci")
    return sysfs
