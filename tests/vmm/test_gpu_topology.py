"""GPU machines on q35: topology, PCI hole, physical address bits, memory on the GPUs' node,
deadlines that grow with memory; and QEMU itself accepting the layout."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from hangar.clock import SystemClock
from hangar.devices.xid import guest_addresses
from hangar.errors import VmmError
from hangar.vmm.accel import host_phys_bits_limit, kvm_choice, tcg_choice
from hangar.vmm.driver import VmHandle, VmSpec
from hangar.vmm.gpu_topology import (
    GIB,
    GpuPassthrough,
    MemoryPlan,
    cpu_list,
    gpu_device_ids,
    launch_timeout_s,
    pci_hole64_bytes,
    phys_bits_needed,
    plan_gpu_topology,
)
from hangar.vmm.hostmem import plan_guest_memory, read_host_memory
from hangar.vmm.qemu import QemuDriver
from hangar.vmm.qemu_argv import qemu_argv
from hangar.vmm.qmp import qmp_execute
from tests.devices.sysfs_fixture import A10_AUDIO, A10_GPU, HGX_H100_GPUS, build_a10_with_audio
from tests.vmm.gpu_host import (
    FOUR_OF_EIGHT_MEMORY_MB,
    SAPPHIRE_RAPIDS_CPUINFO,
    four_of_eight_h100,
    write_host_memory,
)

H100_BARS = [128 * GIB, 32 << 20]
H200_BARS = [256 * GIB, 32 << 20]


def values_of(argv: list[str], flag: str) -> list[str]:
    return [value for option, value in itertools.pairwise(argv) if option == flag]


def test_four_h100s_take_a_terabyte_of_windows_and_h200s_twice_that() -> None:
    h100s = [
        GpuPassthrough(bdf=f"0000:{b:02x}:00.0", numa_node=0, bar_bytes=H100_BARS)
        for b in (0x18, 0x2A, 0x3A, 0x5D)
    ]
    h200s = [g.model_copy(update={"bar_bytes": H200_BARS}) for g in h100s]

    assert h100s[0].window_bytes == 256 * GIB  # 128 GiB + 32 MiB, to a power of two
    assert pci_hole64_bytes(h100s) == (4 * 256 + 256) * GIB
    assert pci_hole64_bytes(h200s) == (4 * 512 + 512) * GIB


def test_phys_bits_limits_follow_the_cpu_and_its_second_level_paging() -> None:
    def cpuinfo(bits: int, flags: str, vmx: str = "") -> str:
        text = f"flags\t\t: {flags}\naddress sizes\t: {bits} bits physical, 48 bits virtual\n"
        return text + (f"vmx flags\t: {vmx}\n" if vmx else "")

    assert host_phys_bits_limit(SAPPHIRE_RAPIDS_CPUINFO) == 46
    assert host_phys_bits_limit(cpuinfo(52, "vmx ept la57", "ept ept_5level")) == 52
    assert host_phys_bits_limit(cpuinfo(52, "vmx ept la57", "ept ept_1gb")) == 48
    assert host_phys_bits_limit(cpuinfo(52, "svm npt la57")) == 52
    assert host_phys_bits_limit(cpuinfo(52, "svm npt")) == 48
    with pytest.raises(VmmError):
        host_phys_bits_limit("flags: vmx\n")


def test_a_hole_the_host_cannot_map_is_refused(tmp_path: Path) -> None:
    plan = MemoryPlan(page_size="1G", nodes=[], prealloc_threads=1)
    gpus = [
        GpuPassthrough(bdf=f"0000:{b:02x}:00.0", numa_node=0, bar_bytes=H200_BARS) for b in range(8)
    ]

    assert phys_bits_needed(0, pci_hole64_bytes(gpus)) == 43
    with pytest.raises(VmmError, match="need 43 physical address bits; this host maps 40"):
        plan_gpu_topology(gpus, plan, 40)


def test_memory_goes_on_1g_pages_of_the_gpus_node_minus_reserved_ones(tmp_path: Path) -> None:
    write_host_memory(tmp_path, free_1g={0: 130, 1: 900}, reserved_1g=3)
    host = read_host_memory(tmp_path)

    fits = plan_guest_memory(127 * 1024, 32, [0, 0], host)
    short = plan_guest_memory(128 * 1024, 32, [0, 0], host)

    assert host.usable(0, "1G") == 127
    assert fits.page_size == "1G" and fits.fallback is None
    [node] = fits.nodes
    assert (node.guest_node, node.host_node, node.vcpus) == (0, 0, list(range(32)))
    assert node.host_cpus[:2] == [0, 1] and len(node.host_cpus) == 112
    assert fits.prealloc_threads == 16
    assert short.page_size == "4K"
    assert short.fallback == (
        "no 1G pages: node 0 has 127 usable 1G pages (3 reserved subtracted), 128 needed; "
        "no 2M pages: node 0 has 0 usable 2M pages (0 reserved subtracted), 65536 needed: "
        "guest memory on 4 KiB pages"
    )


def test_node_1s_free_pages_do_not_count_for_node_0(tmp_path: Path) -> None:
    write_host_memory(tmp_path, free_1g={0: 10, 1: 900}, free_2m={0: 10_000})

    plan = plan_guest_memory(16 * 1024, 8, [0], read_host_memory(tmp_path))

    assert plan.page_size == "2M"
    assert plan.fallback is not None and plan.fallback.startswith("no 1G pages: node 0 has 10")


def test_gpus_on_two_nodes_split_memory_and_vcpus(tmp_path: Path) -> None:
    write_host_memory(tmp_path, free_1g={0: 600, 1: 600})

    plan = plan_guest_memory(1024 * 1024, 128, [0, 0, 1, 1, 0, 1], read_host_memory(tmp_path))

    assert [
        (n.guest_node, n.host_node, n.size_mb, n.vcpus[0], len(n.vcpus)) for n in plan.nodes
    ] == [
        (0, 0, 512 * 1024, 0, 64),
        (1, 1, 512 * 1024, 64, 64),
    ]


def test_the_4_of_8_h100_command_line(tmp_path: Path) -> None:
    spec, topology, _ = four_of_eight_h100(tmp_path)
    argv = qemu_argv(spec, kvm_choice("an HGX host"))

    assert argv[:3] == ["taskset", "-c", "0-55,112-167"]
    assert values_of(argv, "-machine") == ["q35"] and values_of(argv, "-accel") == ["kvm"]
    assert values_of(argv, "-cpu") == ["host,host-phys-bits=on,host-phys-bits-limit=46"]
    assert values_of(argv, "-global") == ["q35-pcihost.pci-hole64-size=1280G"]
    devices = values_of(argv, "-device")
    assert devices.count("pxb-pcie,id=pxb0,bus_nr=128,numa_node=0,bus=pcie.0") == 1
    gpus = [d for d in devices if d.startswith("vfio-pci")]
    assert gpus == [
        f"vfio-pci,host={bdf},id=gpu{i},bus=rp{i},addr=00.0"
        for i, bdf in enumerate(list(HGX_H100_GPUS)[:4])
    ]
    assert gpu_device_ids(topology) == {
        f"gpu{i}": bdf for i, bdf in enumerate(list(HGX_H100_GPUS)[:4])
    }
    assert launch_timeout_s(spec.memory_mb, "1G") == 60 + 768 / 4


def test_a_companion_sits_at_its_gpus_slot_with_multifunction(tmp_path: Path) -> None:
    build_a10_with_audio(tmp_path / "sys")
    write_host_memory(tmp_path / "sys", free_1g={0: 64})
    memory = plan_guest_memory(16 * 1024, 8, [0], read_host_memory(tmp_path / "sys"))
    gpu = GpuPassthrough(
        bdf=A10_GPU, numa_node=0, bar_bytes=[32 * GIB, 32 << 20], companions=[A10_AUDIO]
    )
    topology = plan_gpu_topology([gpu], memory, 46)
    for name in ("k", "i", "r"):
        (tmp_path / name).touch()
    spec = VmSpec.in_run_dir(
        machine_id="m-a10",
        run_dir=tmp_path / "run",
        kernel=tmp_path / "k",
        initrd=tmp_path / "i",
        root_disk=tmp_path / "r",
        cpus=8,
        memory_mb=16 * 1024,
        gpu_topology=topology,
    )

    devices = values_of(qemu_argv(spec, kvm_choice("t")), "-device")

    assert [d for d in devices if d.startswith("vfio-pci")] == [
        f"vfio-pci,host={A10_GPU},id=gpu0,bus=rp0,addr=00.0,multifunction=on",
        f"vfio-pci,host={A10_AUDIO},id=gpu0-f1,bus=rp0,addr=00.1",
    ]
    assert gpu_device_ids(topology) == {"gpu0": A10_GPU, "gpu0-f1": A10_AUDIO}


def test_gpu_machines_never_run_under_tcg_or_on_microvm(tmp_path: Path) -> None:
    spec, _, _ = four_of_eight_h100(tmp_path)

    with pytest.raises(VmmError, match="GPU machines need KVM"):
        qemu_argv(spec, tcg_choice("no /dev/kvm"))
    kvm = kvm_choice("t")
    assert kvm.machine_type.startswith("microvm")
    assert values_of(qemu_argv(spec, kvm), "-machine") == ["q35"]


def test_a_spec_cannot_mix_layouts_or_disagree_on_memory(tmp_path: Path) -> None:
    spec, topology, _ = four_of_eight_h100(tmp_path)
    fields = spec.model_dump()

    with pytest.raises(ValidationError, match="replaces gpus"):
        VmSpec.model_validate(fields | {"gpus": ["0000:18:00.0"]})
    with pytest.raises(ValidationError, match="plans 786432 MiB"):
        VmSpec.model_validate(fields | {"memory_mb": 1024})
    with pytest.raises(ValidationError, match="places 96 vCPUs"):
        VmSpec.model_validate(fields | {"cpus": 8})
    with pytest.raises(ValidationError, match="listed twice"):
        topology.model_validate(
            topology.model_dump() | {"gpus": [topology.gpus[0].model_dump()] * 2}
        )


def test_the_teardown_grace_grows_with_pinned_memory(tmp_path: Path) -> None:
    driver = QemuDriver(accel=kvm_choice("t"))
    handle = VmHandle(
        driver="qemu",
        machine_id="m",
        pid=1,
        start_time=1,
        qmp_socket=tmp_path,
        signal_socket=tmp_path,
        control_log=tmp_path,
        console_log=tmp_path,
        vmm_log=tmp_path,
        accel="kvm",
        machine_type="q35",
        memory_mb=FOUR_OF_EIGHT_MEMORY_MB,
    )

    assert driver._kill_grace_s(handle) == 30 + 768 / 8
    assert driver._kill_grace_s(handle.model_copy(update={"memory_mb": None})) == 30


def test_cpu_lists_are_written_as_ranges() -> None:
    assert cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert cpu_list([5]) == "5"


@pytest.mark.slow
def test_qemu_accepts_the_layout_and_its_firmware_places_each_gpu_behind_its_port(
    tmp_path: Path,
) -> None:
    """The real QEMU, TCG here: the two options that need KVM are swapped for their TCG
    equivalents, the memory shrunk, and each vfio-pci device replaced by a stand-in PCIe
    device with the same id and address. Its firmware enumerates the expander; QMP
    ``query-pci`` then maps each stand-in's guest address back to its host BDF."""
    spec, topology, _ = four_of_eight_h100(tmp_path)
    argv = qemu_argv(spec, kvm_choice("an HGX host"))
    small = argv[argv.index("qemu-system-x86_64") :]
    qmp = tmp_path / "qmp.sock"
    run = [small[0]]
    pairs = iter(small[1:])
    for option in pairs:
        if option in ("-nodefaults", "-no-user-config", "-no-reboot"):
            run.append(option)
            continue
        value = _tcg_stand_in(option, next(pairs))
        if value is not None:
            run += [option, value]
    run += [
        "-chardev",
        f"socket,id=qmp,path={qmp},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    qemu = subprocess.Popen(
        run, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        addresses = asyncio.run(_placed(qmp, gpu_device_ids(topology), qemu))
    finally:
        qemu.kill()
        qemu.wait()
    assert sorted(addresses.values()) == sorted(list(HGX_H100_GPUS)[:4])
    assert all(int(address.split(":")[1], 16) > 0x80 for address in addresses)


DROPPED = ("-kernel", "-initrd", "-append", "-drive", "-chardev", "-serial", "-mon")


def _tcg_stand_in(option: str, value: str) -> str | None:
    """The option as it can run here (TCG, no VFIO, little memory); None drops it."""
    if option in DROPPED or value.startswith(("thread-context", "virtio-blk", "virtserial")):
        return None
    replacements = {
        "-accel": "tcg",
        "-cpu": "max,phys-bits=46",
        "-smp": "2",
        "-m": "256M",
        "-numa": "node,nodeid=0,memdev=ram-node0,cpus=0-1",
    }
    if option in replacements:
        return replacements[option]
    if value.startswith("memory-backend"):
        return "memory-backend-ram,id=ram-node0,size=256M,prealloc=on,host-nodes=0,policy=bind"
    if value.startswith("vfio-pci"):
        fields = dict(part.split("=", 1) for part in value.split(",")[1:])
        return f"virtio-rng-pci,id={fields['id']},bus={fields['bus']},addr={fields['addr']}"
    return value


async def _placed(
    qmp: Path, device_ids: dict[str, str], qemu: subprocess.Popen[bytes]
) -> dict[str, str]:
    clock = SystemClock()
    for _ in range(600):  # bounded: firmware enumerates PCI within a few seconds under TCG
        if qemu.poll() is not None:
            raise AssertionError(qemu.stderr.read().decode() if qemu.stderr else "qemu exited")
        if qmp.exists():
            reply = await qmp_execute(qmp, "query-pci", clock=clock, timeout_s=10)
            assert isinstance(reply, list)
            found = guest_addresses(reply, device_ids)
            if len(found) == len(device_ids):
                return found
        await asyncio.sleep(0.05)
    raise AssertionError("the firmware never placed the stand-in GPUs")
