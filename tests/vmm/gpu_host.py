"""A GPU machine's inputs as the agent would gather them on an HGX H100 host: the devices
layer's groups, the host's NUMA memory and its CPU. Shared by the topology tests and the
README's "4 of 8 H100 SXM" table check."""

from __future__ import annotations

from pathlib import Path

from hangar.devices.groups import read_gpu_groups
from hangar.devices.sysfs import SysfsRoot
from hangar.vmm.accel import host_phys_bits_limit, kvm_choice
from hangar.vmm.driver import VmSpec
from hangar.vmm.gpu_topology import GpuPassthrough, GpuTopology, plan_gpu_topology
from hangar.vmm.hostmem import HostMemory, plan_guest_memory, read_host_memory
from hangar.vmm.qemu_argv import qemu_argv
from tests.devices.sysfs_fixture import build_hgx_h100

# A dual-socket Sapphire Rapids HGX host: 56 cores a socket, SMT on, 5-level paging.
SAPPHIRE_RAPIDS_CPUINFO = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\n"
    "flags\t\t: fpu vme de pse msr pae mce cx8 apic vmx ept la57 avx512f\n"
    "vmx flags\t: vnmi preemption_timer invvpid ept_x_only ept_ad ept_1gb ept_5level "
    "flexpriority tsc_offset vtpr mtf vapic ept vpid unrestricted_guest\n"
    "address sizes\t: 46 bits physical, 57 bits virtual\n"
)
NODE_CPUS = {0: "0-55,112-167", 1: "56-111,168-223"}
FOUR_OF_EIGHT_CPUS = 96
FOUR_OF_EIGHT_MEMORY_MB = 768 * 1024


def write_host_memory(
    sys_root: Path,
    free_1g: dict[int, int],
    free_2m: dict[int, int] | None = None,
    reserved_1g: int = 0,
    reserved_2m: int = 0,
) -> None:
    """``/sys/devices/system/node`` and ``/sys/kernel/mm/hugepages`` as a host shows them."""
    for node, cpus in NODE_CPUS.items():
        folder = sys_root / f"devices/system/node/node{node}"
        for size, free in (
            ("hugepages-1048576kB", free_1g.get(node, 0)),
            ("hugepages-2048kB", (free_2m or {}).get(node, 0)),
        ):
            (folder / "hugepages" / size).mkdir(parents=True, exist_ok=True)
            (folder / "hugepages" / size / "free_hugepages").write_text(f"{free}\n")
        (folder / "cpulist").write_text(cpus + "\n")
    for size, reserved in (("hugepages-1048576kB", reserved_1g), ("hugepages-2048kB", reserved_2m)):
        folder = sys_root / "kernel/mm/hugepages" / size
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "resv_hugepages").write_text(f"{reserved}\n")


def hgx_passthrough(sys_root: Path, count: int) -> list[GpuPassthrough]:
    """The first ``count`` GPU groups of the HGX fixture, as the agent hands them to the VMM."""
    groups = read_gpu_groups(SysfsRoot(sys_root))[:count]
    return [
        GpuPassthrough(
            bdf=gpu,
            numa_node=group.numa_node,
            bar_bytes=next(f.bar_bytes for f in group.functions if f.bdf == gpu),
            companions=group.companions_of(gpu),
        )
        for group in groups
        for gpu in group.gpus
    ]


def four_of_eight_h100(root: Path) -> tuple[VmSpec, GpuTopology, HostMemory]:
    sys_root = root / "sys"
    build_hgx_h100(sys_root)
    write_host_memory(sys_root, free_1g={0: 900, 1: 900}, reserved_1g=4)
    host = read_host_memory(sys_root)
    memory = plan_guest_memory(FOUR_OF_EIGHT_MEMORY_MB, FOUR_OF_EIGHT_CPUS, [0, 0, 0, 0], host)
    topology = plan_gpu_topology(
        hgx_passthrough(sys_root, 4), memory, host_phys_bits_limit(SAPPHIRE_RAPIDS_CPUINFO)
    )
    run = root / "run"
    for name in ("vmlinuz", "initrd", "root.ext4", "driver.ext4"):
        (root / name).touch()
    spec = VmSpec.in_run_dir(
        machine_id="m-4xh100",
        run_dir=run,
        kernel=root / "vmlinuz",
        initrd=root / "initrd",
        root_disk=root / "root.ext4",
        cpus=FOUR_OF_EIGHT_CPUS,
        memory_mb=FOUR_OF_EIGHT_MEMORY_MB,
        gpu_topology=topology,
    )
    return spec, topology, host


def four_of_eight_h100_argv(root: Path) -> list[str]:
    spec, _, _ = four_of_eight_h100(root)
    return qemu_argv(spec, kvm_choice("an HGX host"))
