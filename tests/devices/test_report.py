from __future__ import annotations

from pathlib import Path

from rich.console import Console

from hangar.devices.inventory import HostInventory, read_inventory
from hangar.devices.nvml import NoNvml, PynvmlReader
from hangar.devices.report import render_inspect_report
from hangar.devices.sysfs import SysfsRoot
from tests.devices.conftest import ready_runner
from tests.devices.fake_pynvml import FakePynvml, hgx_nvml_gpus, mig_slices
from tests.devices.sysfs_fixture import SysfsBuilder, build_without_gpu


def _text(inventory: HostInventory) -> str:
    console = Console(record=True, width=250, color_system=None)
    console.print(render_inspect_report(inventory))
    return console.export_text()


def test_report_shows_gpus_nvswitches_and_mig_slices(hgx: SysfsBuilder) -> None:
    gpus = hgx_nvml_gpus()
    gpus[2].mig_mode = (1, 1)
    gpus[2].mig_slots = mig_slices()
    nvml = FakePynvml(gpus)
    inventory = read_inventory(
        SysfsRoot(hgx.root), nvml=PynvmlReader(load=lambda: nvml), runner=ready_runner()
    )

    text = _text(inventory)

    gpu_rows = [line for line in text.splitlines() if "h100-sxm" in line]
    assert len(gpu_rows) == 8
    assert all("nvlink-0000:18:00.0" in row and "79.6 GiB" in row for row in gpu_rows)
    assert "GPU-00000000-1111-2222-3333-444444444444" in gpu_rows[0]
    assert "driver 550.90.07" in text
    assert text.count("nvswitch-gen3") == 4
    assert "MIG-aaaaaaaa-0000-0000-0000-000000000002" in text and "1g.10gb" in text
    assert "0000:3a:00.0 unavailable: MIG mode is on" in text


def test_report_shows_the_foreign_function_in_a_gpus_group(
    shared_with_nic: SysfsBuilder,
) -> None:
    inventory = read_inventory(
        SysfsRoot(shared_with_nic.root), nvml=NoNvml("no driver here"), runner=ready_runner()
    )

    text = _text(inventory)

    assert "0000:04:00.0 unavailable: IOMMU group 15 also holds 0000:05:00.0" in text
    assert "IOMMU group 15 of 0000:04:00.0" in text
    [foreign_row] = [line for line in text.splitlines() if "foreign" in line]
    assert "0000:05:00.0" in foreign_row and "Ethernet controller 8086:1521" in foreign_row
    assert "no driver here" in text


def test_report_says_when_there_is_no_gpu(tmp_path: Path) -> None:
    build_without_gpu(tmp_path)
    inventory = read_inventory(SysfsRoot(tmp_path), nvml=NoNvml(), runner=ready_runner())

    text = _text(inventory)

    assert "No NVIDIA GPU found on this host." in text
    assert "vfio-pci is neither loaded nor installed" in text
