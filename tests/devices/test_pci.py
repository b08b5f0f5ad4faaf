from __future__ import annotations

from pathlib import Path

import pytest

from hangar.devices.pci import list_pci_devices, normalize_bdf, parse_resource, read_pci_device
from hangar.devices.sysfs import ReadOnlyWriter, SysfsRoot
from hangar.errors import DeviceError
from tests.devices.sysfs_fixture import GIB, MIB, SysfsBuilder


@pytest.mark.parametrize(
    ("spelling", "bdf"),
    [
        ("0000:18:00.0", "0000:18:00.0"),
        ("00000000:3B:00.1", "0000:3b:00.1"),  # NVML
        ("3b:00.0", "0000:3b:00.0"),  # lspci without -D
        ("10000:e1:00.0", "10000:e1:00.0"),  # VMD domain
    ],
)
def test_normalize_bdf_accepts_sysfs_nvml_and_lspci_spellings(spelling: str, bdf: str) -> None:
    assert normalize_bdf(spelling) == bdf


def test_normalize_bdf_rejects_what_is_not_an_address() -> None:
    with pytest.raises(DeviceError) as raised:
        normalize_bdf("GPU-0")
    assert raised.value.fields["bdf"] == "GPU-0"


def test_reads_every_attribute_of_an_h100_sxm(hgx: SysfsBuilder) -> None:
    gpu = read_pci_device(SysfsRoot(hgx.root), "0000:9a:00.0")

    assert (gpu.vendor_id, gpu.device_id) == (0x10DE, 0x2330)
    assert gpu.pci_id == "10de:2330"
    assert gpu.class_code == 0x030200 and gpu.class_name == "3D controller"
    assert (gpu.subsystem_vendor_id, gpu.subsystem_device_id) == (0x10DE, 0x16C1)
    assert gpu.numa_node == 1
    assert gpu.iommu_group == 29  # fifth GPU: groups 10-13, 14-17... its own is 29
    assert gpu.driver == "nvidia"
    assert gpu.driver_override is None
    assert gpu.reset_methods == ["flr", "bus"]
    assert gpu.slot == "0000:9a:00"
    assert gpu.sysfs_path == (
        "devices/pci0000:97/0000:97:01.0/0000:98:00.0/0000:99:00.0/0000:9a:00.0"
    )
    assert [(bar.index, bar.size) for bar in gpu.bars] == [
        (0, 16 * MIB),
        (1, 128 * GIB),
        (3, 32 * MIB),
    ]
    assert not gpu.bars[0].prefetchable and not gpu.bars[0].is_64bit
    assert gpu.bars[1].prefetchable and gpu.bars[1].is_64bit and not gpu.bars[1].is_io


def test_numa_node_minus_one_and_missing_reset_method_read_as_none(tmp_path: Path) -> None:
    builder = SysfsBuilder(tmp_path)
    builder.add_device("0000:00:05.0", vendor=0x10DE, device=0x2335, class_code=0x030200)

    device = read_pci_device(SysfsRoot(tmp_path), "0000:00:05.0")

    assert device.numa_node is None
    assert device.reset_methods is None
    assert device.iommu_group is None
    assert device.driver is None


def test_absent_device_raises_with_its_address(hgx: SysfsBuilder) -> None:
    with pytest.raises(DeviceError) as raised:
        read_pci_device(SysfsRoot(hgx.root), "0000:ee:00.0")
    assert raised.value.fields == {"bdf": "0000:ee:00.0"}


def test_lists_every_function_in_address_order(l40s: SysfsBuilder) -> None:
    devices = list_pci_devices(SysfsRoot(l40s.root))

    assert [device.bdf for device in devices] == [
        "0000:00:01.1",
        "0000:01:00.0",
        "0000:40:01.1",
        "0000:41:00.0",
        "0000:80:01.1",
        "0000:81:00.0",
        "0000:c0:01.1",
        "0000:c1:00.0",
    ]
    assert [device.is_bridge for device in devices] == [True, False] * 4


def test_resource_io_bar_and_rom() -> None:
    text = "\n".join(
        [
            "0x000000000000e000 0x000000000000e07f 0x0000000000040101",
            "0x0000000000000000 0x0000000000000000 0x0000000000000000",
            *["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 4,
            "0x00000000fb000000 0x00000000fb07ffff 0x0000000000046200",
        ]
    )
    bars = parse_resource(text)

    assert [(bar.index, bar.size, bar.is_io, bar.is_rom) for bar in bars] == [
        (0, 0x80, True, False),
        (6, 0x80000, False, True),
    ]


def test_read_only_writer_refuses_and_leaves_the_file(hgx: SysfsBuilder) -> None:
    sysfs = SysfsRoot(hgx.root, writer=ReadOnlyWriter())
    override = "bus/pci/devices/0000:18:00.0/driver_override"

    with pytest.raises(DeviceError) as raised:
        sysfs.write(override, "vfio-pci")

    assert raised.value.fields["path"] == override
    assert sysfs.read_text(override) == "(null)"


def test_file_writer_reports_the_kernels_refusal_with_errno(tmp_path: Path) -> None:
    sysfs = SysfsRoot(tmp_path)
    with pytest.raises(DeviceError) as raised:
        sysfs.write("bus/pci/devices/0000:01:00.0/reset", "1")
    assert raised.value.fields["errno"] == 2
    assert raised.value.fields["path"] == "bus/pci/devices/0000:01:00.0/reset"
