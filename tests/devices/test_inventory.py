from __future__ import annotations

from pathlib import Path

from hangar.devices.inventory import IOMMU_OFF, read_inventory
from hangar.devices.nvml import NoNvml
from hangar.devices.readiness import CommandResult, SubprocessRunner, probe_hypervisor, probe_vfio
from hangar.devices.sysfs import SysfsRoot
from tests.devices.conftest import StaticRunner, ready_runner
from tests.devices.sysfs_fixture import (
    A10_AUDIO,
    A10_GPU,
    CLASS_3D,
    HGX_H100_GPUS,
    HGX_H100_NVSWITCHES,
    INTERRUPTS_WITHOUT_REMAPPING,
    L40S_GPUS,
    NO_IOMMU_GPU,
    NVIDIA,
    SHARED_GPU,
    SHARED_NIC,
    SysfsBuilder,
)


def test_hgx_h100_host_lists_eight_gpus_on_two_nodes_and_four_nvswitches(
    hgx: SysfsBuilder,
) -> None:
    inventory = read_inventory(SysfsRoot(hgx.root), nvml=NoNvml(), runner=ready_runner())

    assert [gpu.bdf for gpu in inventory.gpus] == list(HGX_H100_GPUS)
    assert {gpu.kind.name for gpu in inventory.gpus} == {"h100-sxm"}
    assert {gpu.bdf: gpu.numa_node for gpu in inventory.gpus} == HGX_H100_GPUS
    groups = [gpu.iommu_group for gpu in inventory.gpus]
    assert len(set(groups)) == 8 and None not in groups
    assert all([m.bdf for m in gpu.group_members] == [gpu.bdf] for gpu in inventory.gpus)
    assert [switch.bdf for switch in inventory.nvswitches] == HGX_H100_NVSWITCHES
    assert {switch.name for switch in inventory.nvswitches} == {"nvswitch-gen3"}
    assert all(gpu.available for gpu in inventory.gpus), [
        gpu.unavailable_reasons for gpu in inventory.gpus
    ]
    assert inventory.iommu_enabled and inventory.vfio_available and inventory.reasons == []


def test_hgx_gpus_share_one_nvlink_domain_through_the_nvswitches(hgx: SysfsBuilder) -> None:
    inventory = read_inventory(SysfsRoot(hgx.root), nvml=NoNvml(), runner=ready_runner())

    assert {gpu.nvlink_domain for gpu in inventory.gpus} == {"nvlink-0000:18:00.0"}
    assert all(gpu.nvswitches == HGX_H100_NVSWITCHES for gpu in inventory.gpus)
    assert {gpu.nvlink_source for gpu in inventory.gpus} == {"sysfs"}


def test_l40s_host_offers_four_pcie_gpus_without_nvlink(l40s: SysfsBuilder) -> None:
    inventory = read_inventory(SysfsRoot(l40s.root), nvml=NoNvml(), runner=ready_runner())

    assert [(gpu.bdf, gpu.kind.name, gpu.numa_node) for gpu in inventory.gpus] == [
        (bdf, "l40s", node) for bdf, node in L40S_GPUS.items()
    ]
    assert all(gpu.available and gpu.nvlink_domain is None for gpu in inventory.gpus)
    assert inventory.nvswitches == []
    assert all(gpu.kind.form_factor == "pcie" for gpu in inventory.gpus)


def test_a10_group_holds_its_audio_function_and_stays_available(a10: SysfsBuilder) -> None:
    inventory = read_inventory(SysfsRoot(a10.root), nvml=NoNvml(), runner=ready_runner())

    [gpu] = inventory.gpus
    assert gpu.bdf == A10_GPU and gpu.kind.name == "a10"
    assert [(m.bdf, m.role, m.driver) for m in gpu.group_members] == [
        (A10_GPU, "gpu", "nvidia"),
        (A10_AUDIO, "companion", "snd_hda_intel"),
    ]
    assert gpu.available


def test_gpu_sharing_a_group_with_a_nic_is_unavailable_and_says_why(
    shared_with_nic: SysfsBuilder,
) -> None:
    inventory = read_inventory(
        SysfsRoot(shared_with_nic.root), nvml=NoNvml(), runner=ready_runner()
    )

    [gpu] = inventory.gpus
    roles = {member.bdf: member.role for member in gpu.group_members}
    assert roles[SHARED_GPU] == "gpu"
    assert roles[SHARED_NIC] == "foreign"
    assert {roles[bdf] for bdf in ("0000:02:00.0", "0000:03:08.0", "0000:03:10.0")} == {"bridge"}
    assert not gpu.available
    assert gpu.unavailable_reason == (
        "IOMMU group 15 also holds 0000:05:00.0 (Ethernet controller 8086:1521, driver igb)"
    )
    assert inventory.reasons == []  # the host is fine; this one GPU is not


def test_host_without_iommu_offers_no_gpu_for_vfio(no_iommu: SysfsBuilder) -> None:
    inventory = read_inventory(SysfsRoot(no_iommu.root), nvml=NoNvml(), runner=ready_runner())

    assert not inventory.iommu_enabled
    assert inventory.reasons == [IOMMU_OFF]
    [gpu] = inventory.gpus
    assert gpu.bdf == NO_IOMMU_GPU and gpu.kind.name == "h100-pcie"
    assert gpu.iommu_group is None
    assert not gpu.available
    assert gpu.unavailable_reasons == [IOMMU_OFF]
    assert inventory.available_gpus == []


def test_unknown_nvidia_gpu_is_listed_not_dropped(tmp_path: Path) -> None:
    builder = SysfsBuilder(tmp_path)
    builder.add_driver("vfio-pci")
    builder.add_device(
        "0000:01:00.0",
        vendor=NVIDIA,
        device=0x2684,
        class_code=CLASS_3D,
        driver="nvidia",
        iommu_group=1,
        reset_methods=["flr"],
    )

    [gpu] = read_inventory(SysfsRoot(tmp_path), nvml=NoNvml(), runner=ready_runner()).gpus

    assert gpu.kind.name == "unknown-10de:2684"
    assert not gpu.kind.known


def test_gpu_without_a_usable_reset_method_is_unavailable(tmp_path: Path) -> None:
    builder = SysfsBuilder(tmp_path / "sys")
    builder.add_driver("vfio-pci")
    for bdf, methods in (("0000:01:00.0", ["device_specific"]), ("0000:02:00.0", None)):
        builder.add_device(
            bdf,
            vendor=NVIDIA,
            device=0x26B9,
            class_code=CLASS_3D,
            driver="nvidia",
            iommu_group=int(bdf[6]),
            reset_methods=methods,
        )

    gpus = read_inventory(SysfsRoot(builder.root), nvml=NoNvml(), runner=ready_runner()).gpus

    assert [gpu.unavailable_reasons for gpu in gpus] == [
        [
            "0000:01:00.0 (gpu) cannot be reset: no FLR, PM or bus reset "
            "(reset_method lists device_specific)"
        ],
        ["0000:02:00.0 (gpu) cannot be reset: the kernel exposes no reset_method for it"],
    ]


def test_an_audio_companion_that_cannot_be_reset_makes_its_gpu_unavailable(
    a10: SysfsBuilder,
) -> None:
    (a10.root / f"bus/pci/devices/{A10_AUDIO}/reset_method").write_text("\n")

    [gpu] = read_inventory(SysfsRoot(a10.root), nvml=NoNvml(), runner=ready_runner()).gpus

    assert not gpu.available
    assert gpu.unavailable_reasons == [
        f"{A10_AUDIO} (companion) cannot be reset: no FLR, PM or bus reset "
        "(reset_method lists nothing)"
    ]


def test_vfio_module_on_disk_but_not_loaded_is_not_ready(tmp_path: Path) -> None:
    builder = SysfsBuilder(tmp_path / "sys")
    runner = StaticRunner(
        {"modinfo": CommandResult(returncode=0, stdout="/lib/modules/6.1/vfio-pci.ko\n")}
    )

    status = probe_vfio(SysfsRoot(builder.root), runner)

    assert status.installed and not status.loaded and not status.available
    assert status.problems == [
        "vfio-pci module at /lib/modules/6.1/vfio-pci.ko, not loaded (modprobe vfio-pci)"
    ]
    assert runner.commands == [["modinfo", "-n", "vfio-pci"]]


def test_a_ready_host_has_vfio_loaded_its_node_and_interrupt_remapping(
    l40s: SysfsBuilder,
) -> None:
    status = probe_vfio(SysfsRoot(l40s.root), StaticRunner({}))

    assert status.available and status.loaded and status.container_node
    assert status.interrupt_remapping is True and not status.unsafe_interrupts
    assert status.problems == []


def test_vfio_without_its_device_node_is_not_ready(l40s: SysfsBuilder) -> None:
    assert l40s.host is not None
    (l40s.host / "dev/vfio/vfio").unlink()

    inventory = read_inventory(SysfsRoot(l40s.root), nvml=NoNvml(), runner=ready_runner())

    assert not inventory.vfio_available
    assert inventory.reasons == [f"{l40s.host / 'dev/vfio/vfio'} does not exist"]
    assert not any(gpu.available for gpu in inventory.gpus)


def test_without_interrupt_remapping_vfio_is_not_ready(l40s: SysfsBuilder) -> None:
    """vfio_iommu_type1 refuses to attach a group when interrupts are not remapped."""
    assert l40s.host is not None
    (l40s.host / "proc/interrupts").write_text(INTERRUPTS_WITHOUT_REMAPPING)

    status = probe_vfio(SysfsRoot(l40s.root), StaticRunner({}))

    assert status.interrupt_remapping is False and not status.available
    assert "interrupt remapping is off" in status.detail


def test_allowing_unsafe_interrupts_is_not_ready(l40s: SysfsBuilder) -> None:
    (l40s.root / "module/vfio_iommu_type1/parameters/allow_unsafe_interrupts").write_text("Y\n")

    status = probe_vfio(SysfsRoot(l40s.root), StaticRunner({}))

    assert status.unsafe_interrupts and not status.available
    assert "allow_unsafe_interrupts=Y" in status.detail


def test_a_sysfs_root_of_no_known_host_is_not_ready(tmp_path: Path) -> None:
    builder = SysfsBuilder(tmp_path / "elsewhere")
    builder.add_driver("vfio-pci")

    status = probe_vfio(SysfsRoot(builder.root), StaticRunner({}))

    assert not status.available
    assert status.interrupt_remapping is None


def test_missing_vfio_and_qemu_make_every_gpu_unavailable(l40s: SysfsBuilder) -> None:
    for entry in (l40s.root / "bus/pci/drivers/vfio-pci").iterdir():
        entry.unlink()
    (l40s.root / "bus/pci/drivers/vfio-pci").rmdir()

    inventory = read_inventory(SysfsRoot(l40s.root), nvml=NoNvml(), runner=StaticRunner({}))

    assert not inventory.vfio_available
    assert not inventory.hypervisor.available
    assert len(inventory.reasons) == 2
    assert all(gpu.unavailable_reasons == inventory.reasons for gpu in inventory.gpus)


def test_hypervisor_probe_runs_the_real_qemu_binary() -> None:
    status = probe_hypervisor(SubprocessRunner())

    assert status.available, status.detail
    assert status.version is not None and status.version.startswith("QEMU emulator version")


def test_hypervisor_probe_reports_a_missing_binary() -> None:
    status = probe_hypervisor(SubprocessRunner(), binary="qemu-system-hangar-absent")

    assert not status.available
    assert "exit 127" in status.detail
