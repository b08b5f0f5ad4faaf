"""What a GPU machine's QEMU needs beyond a plain machine, as data: pure, so tests and the
README's table read it without a GPU.

Big GPUs do not fit the defaults. An H100's BAR1 is 128 GiB and an H200's 256 GiB; every
GPU's 64-bit BARs must fit the guest's 64-bit PCI hole, each behind its own root port
whose window is a power of two aligned to its size. The guest's physical address space
(``host-phys-bits``) must hold RAM plus that hole, but no more than the host's EPT/NPT can
map. CUDA on HGX boards wants each GPU behind a root port of the NUMA node it sits on
(a ``pxb-pcie`` expander per node), not on a flat root bus. Guest memory comes from 1 GiB
pages bound to the GPUs' node; preallocating and pinning a terabyte takes minutes, so the
launch and teardown deadlines grow with memory.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hangar.errors import VmmError

GIB = 1 << 30
MIB = 1 << 20
LOW_MEMORY_BYTES = 4 * GIB
"""Below 4 GiB: low RAM and the 32-bit PCI hole; RAM above it starts at 4 GiB."""
PXB_BUS_BASE = 0x80
PXB_BUS_STRIDE = 0x20
"""Each NUMA node's expander gets 32 bus numbers, enough for a root port per GPU."""

PageSize = Literal["1G", "2M", "4K"]
PAGE_BYTES: dict[PageSize, int] = {"1G": GIB, "2M": 2 * MIB, "4K": 4096}

PCI_BDF_PATTERN = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class GpuPassthrough(BaseModel):
    """One GPU and the functions of its slot that go with it."""

    model_config = ConfigDict(frozen=True)

    bdf: str
    numa_node: int | None
    bar_bytes: list[int] = Field(description="sizes of the GPU's 64-bit memory BARs")
    companions: list[str] = Field(
        default_factory=list,
        description="other functions of the same slot (HD audio): passed at the same guest "
        "slot, the GPU with multifunction=on",
    )

    @field_validator("bdf")
    @classmethod
    def _bdf(cls, value: str) -> str:
        if not PCI_BDF_PATTERN.fullmatch(value):
            raise ValueError(f"GPU {value!r} is not a PCI address like 0000:65:00.0")
        return value

    @field_validator("companions")
    @classmethod
    def _companions(cls, value: list[str]) -> list[str]:
        for bdf in value:
            if not PCI_BDF_PATTERN.fullmatch(bdf):
                raise ValueError(f"companion {bdf!r} is not a PCI address")
        return value

    @property
    def window_bytes(self) -> int:
        """The root port's prefetchable window: the BARs' sum, up to a power of two."""
        return next_power_of_two(sum(self.bar_bytes))


class MemoryNode(BaseModel):
    model_config = ConfigDict(frozen=True)

    guest_node: int
    host_node: int | None
    """None: the host has no NUMA information for the GPUs; nothing is bound."""
    size_mb: int
    host_cpus: list[int] = []
    """The host CPUs of that node: QEMU (vCPUs, preallocation) runs on them."""
    vcpus: list[int] = []
    """The guest's vCPU indices on this guest node."""


class MemoryPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    page_size: PageSize
    nodes: list[MemoryNode]
    prealloc_threads: int = Field(ge=1)
    fallback: str | None = None
    """Why the memory is not on 1 GiB pages: an event for the machine, never silent."""

    @property
    def memory_mb(self) -> int:
        return sum(node.size_mb for node in self.nodes)

    @property
    def host_cpus(self) -> list[int]:
        return sorted({cpu for node in self.nodes for cpu in node.host_cpus})


class GpuTopology(BaseModel):
    """The GPU part of a :class:`hangar.vmm.driver.VmSpec`."""

    model_config = ConfigDict(frozen=True)

    gpus: list[GpuPassthrough] = Field(min_length=1)
    memory: MemoryPlan
    phys_bits: int = Field(ge=36, le=57)
    """``host-phys-bits-limit``: enough for RAM and the hole, within what the host maps."""

    @field_validator("gpus")
    @classmethod
    def _unique(cls, value: list[GpuPassthrough]) -> list[GpuPassthrough]:
        seen = [bdf for gpu in value for bdf in (gpu.bdf, *gpu.companions)]
        if len(set(seen)) != len(seen):
            raise ValueError("a PCI function is listed twice")
        return value

    @property
    def pci_hole64_bytes(self) -> int:
        return pci_hole64_bytes(self.gpus)

    @property
    def numa_nodes(self) -> list[int | None]:
        """The GPUs' host nodes, in the order their expanders are created."""
        nodes: list[int | None] = []
        for gpu in self.gpus:
            if gpu.numa_node not in nodes:
                nodes.append(gpu.numa_node)
        return nodes

    def placed(self) -> list[tuple[int, GpuPassthrough]]:
        """(expander, GPU) in device order: GPU ``i`` here is QEMU's ``gpu{i}``."""
        return [
            (expander, gpu)
            for expander, node in enumerate(self.numa_nodes)
            for gpu in self.gpus
            if gpu.numa_node == node
        ]


def next_power_of_two(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


def pci_hole64_bytes(gpus: list[GpuPassthrough]) -> int:
    """Room for every root port's window, plus the largest once more: the firmware aligns
    the first window to its size, which can leave that much unused at the hole's start."""
    windows = [gpu.window_bytes for gpu in gpus]
    return round_up(sum(windows) + max(windows), GIB)


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def phys_bits_needed(memory_mb: int, hole_bytes: int) -> int:
    """Address bits for 4 GiB of low space, RAM above it, then the 64-bit hole."""
    top = LOW_MEMORY_BYTES + memory_mb * MIB + hole_bytes
    return max(36, math.ceil(math.log2(top)))


def launch_timeout_s(memory_mb: int, page_size: PageSize) -> float:
    """From spawning QEMU to its monitor answering: preallocation and VFIO pinning of all
    guest memory happen first. 60 s, plus 1 s per 4 GiB on huge pages (QEMU's parallel
    preallocation and VFIO pinning of large pages), 1 s per GiB on 4 KiB pages."""
    gib = memory_mb / 1024
    return 60.0 + (gib / 4 if page_size != "4K" else gib)


def unpin_time_s(memory_mb: int) -> float:
    """What unpinning and freeing guest memory adds to a VMM's exit after SIGKILL: 1 s per
    8 GiB (a terabyte takes minutes, past a fixed 30 s grace)."""
    return memory_mb / 1024 / 8


def plan_gpu_topology(
    gpus: list[GpuPassthrough], memory: MemoryPlan, host_phys_bits: int
) -> GpuTopology:
    """The topology for these GPUs and this memory; VmmError when RAM and the GPUs' BARs do
    not fit the guest-physical space this host can map (``host_phys_bits``)."""
    hole = pci_hole64_bytes(gpus)
    needed = phys_bits_needed(memory.memory_mb, hole)
    if needed > host_phys_bits:
        raise VmmError(
            f"{memory.memory_mb} MiB of memory and a {hole // GIB} GiB PCI hole for the GPUs' "
            f"BARs need {needed} physical address bits; this host maps {host_phys_bits}",
            field="gpu_topology",
            phys_bits_needed=needed,
            host_phys_bits=host_phys_bits,
        )
    return GpuTopology(gpus=gpus, memory=memory, phys_bits=host_phys_bits)


def gpu_device_ids(topology: GpuTopology) -> dict[str, str]:
    """QEMU device id -> host BDF for every passed-through function (for QMP ``query-pci``
    and mapping the guest's Xid addresses back to host GPUs)."""
    ids: dict[str, str] = {}
    for index, (_, gpu) in enumerate(topology.placed()):
        ids[f"gpu{index}"] = gpu.bdf
        for companion in gpu.companions:
            ids[f"gpu{index}-f{companion.rsplit('.', 1)[1]}"] = companion
    return ids


def cpu_list(cpus: list[int]) -> str:
    """``0-3,8`` for [0, 1, 2, 3, 8], as taskset and QEMU's ``cpus=`` read CPU lists."""
    ranges: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{first}-{last}" if last != first else f"{first}" for first, last in ranges)
