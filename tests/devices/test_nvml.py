from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest

from hangar.devices.inventory import read_inventory
from hangar.devices.nvml import NoNvml, NvmlReport, PynvmlReader
from hangar.devices.sysfs import SysfsRoot
from tests.devices.conftest import ready_runner
from tests.devices.fake_pynvml import (
    H100_MEMORY,
    NVML_ERROR_DRIVER_NOT_LOADED,
    FakeGpu,
    FakePynvml,
    hgx_nvml_gpus,
    mig_slices,
    nvml_bus_id,
)
from tests.devices.sysfs_fixture import (
    CLASS_3D,
    GIB,
    HGX_H100_GPUS,
    HGX_H100_NVSWITCHES,
    NVIDIA,
    SysfsBuilder,
)


def _reader(nvml: FakePynvml) -> PynvmlReader:
    return PynvmlReader(load=lambda: nvml)


def test_reader_decodes_uuids_memory_driver_and_bus_ids() -> None:
    nvml = FakePynvml(hgx_nvml_gpus())

    report = _reader(nvml).read()

    assert report.available and report.reason is None
    assert report.driver_version == "550.90.07"
    assert [gpu.bus_id for gpu in report.gpus] == list(HGX_H100_GPUS)
    assert report.gpus[0].uuid == "GPU-00000000-1111-2222-3333-444444444444"
    assert report.gpus[0].memory_total_bytes == H100_MEMORY
    assert report.gpus[0].mig_mode == "disabled"
    assert report.gpus[0].nvlink_peers == HGX_H100_NVSWITCHES
    assert not nvml.initialised  # shut down again


def test_reader_lists_mig_instances_with_their_profiles() -> None:
    gpus = hgx_nvml_gpus()
    gpus[2].mig_mode = (1, 1)
    gpus[2].mig_slots = mig_slices()

    report = _reader(FakePynvml(gpus)).read()

    migged = report.gpus[2]
    assert migged.mig_mode == "enabled" and migged.mig_mode_pending is None
    assert [
        (m.uuid, m.profile, m.gpu_instance_id, m.memory_total_bytes) for m in migged.mig_instances
    ] == [
        ("MIG-aaaaaaaa-0000-0000-0000-000000000001", "3g.40gb", 1, 40 * GIB),
        ("MIG-aaaaaaaa-0000-0000-0000-000000000002", "1g.10gb", 5, 10 * GIB),
    ]
    assert migged.errors == []
    assert report.gpus[0].mig_instances == []


def test_reader_reports_pending_mig_change_and_unsupported_mig() -> None:
    gpus = hgx_nvml_gpus()[:2]
    gpus[0].mig_mode = (0, 1)
    gpus[1].mig_mode = None
    gpus[1].nvlinks = None

    report = _reader(FakePynvml(gpus)).read()

    assert (report.gpus[0].mig_mode, report.gpus[0].mig_mode_pending) == ("disabled", "enabled")
    assert report.gpus[1].mig_mode == "unsupported"
    assert report.gpus[1].nvlink_peers == []
    assert report.gpus[1].errors == []


def test_reader_notes_a_lost_gpu_and_keeps_the_others() -> None:
    gpus = hgx_nvml_gpus()[:2]
    gpus[1].lost = True

    report = _reader(FakePynvml(gpus)).read()

    assert report.available
    assert [gpu.bus_id for gpu in report.gpus] == ["0000:18:00.0"]
    assert report.errors == ["GPU 1: GPU is lost"]


def test_reader_only_queries_nvml() -> None:
    gpus = hgx_nvml_gpus()
    gpus[0].mig_mode = (1, 1)
    gpus[0].mig_slots = mig_slices()
    nvml = FakePynvml(gpus)

    _reader(nvml).read()

    assert "nvmlDeviceGetMigDeviceHandleByIndex" in nvml.calls
    assert "nvmlDeviceGetNvLinkRemotePciInfo" in nvml.calls
    assert [
        call for call in nvml.calls if not call.startswith(("nvmlDeviceGet", "nvmlSystemGet"))
    ] == [
        "nvmlInit",
        "nvmlShutdown",
    ]


def test_reader_says_why_when_the_driver_is_not_loaded() -> None:
    nvml = FakePynvml([], init_error=NVML_ERROR_DRIVER_NOT_LOADED)

    report = _reader(nvml).read()

    assert report == NvmlReport(available=False, reason="NVML init failed: Driver Not Loaded")


def test_real_pynvml_without_a_driver_reports_unavailable() -> None:
    """This machine has nvidia-ml-py but no NVIDIA driver: NVML's init fails."""
    report = PynvmlReader().read()

    if report.available:
        pytest.skip("this machine has a working NVIDIA driver")
    assert report.reason is not None and report.reason.startswith("NVML init failed")


def test_absent_nvidia_ml_py_reports_unavailable() -> None:
    def absent() -> Any:
        return importlib.import_module("pynvml_not_installed_here")

    report = PynvmlReader(load=absent).read()

    assert not report.available
    assert report.reason is not None and "pynvml_not_installed_here" in report.reason


def test_inventory_still_works_with_real_pynvml_failing(hgx: SysfsBuilder) -> None:
    inventory = read_inventory(SysfsRoot(hgx.root), runner=ready_runner())

    if inventory.nvml_status.available:
        pytest.skip("this machine has a working NVIDIA driver")
    assert len(inventory.gpus) == 8
    assert inventory.nvml_status.reason
    assert all(gpu.uuid is None and gpu.mig_mode == "unknown" for gpu in inventory.gpus)
    assert all(gpu.available for gpu in inventory.gpus)


def test_inventory_merges_nvml_by_bus_id(hgx: SysfsBuilder) -> None:
    gpus = hgx_nvml_gpus()
    gpus[2].mig_mode = (1, 1)
    gpus[2].mig_slots = mig_slices()

    inventory = read_inventory(
        SysfsRoot(hgx.root), nvml=_reader(FakePynvml(gpus)), runner=ready_runner()
    )

    by_bdf = {gpu.bdf: gpu for gpu in inventory.gpus}
    assert by_bdf["0000:2a:00.0"].uuid == "GPU-00000001-1111-2222-3333-444444444444"
    assert by_bdf["0000:db:00.0"].memory_total_bytes == H100_MEMORY
    assert inventory.nvml_status.driver_version == "550.90.07"
    migged = by_bdf["0000:3a:00.0"]
    assert [m.profile for m in migged.mig_instances] == ["3g.40gb", "1g.10gb"]
    assert not migged.available
    assert migged.unavailable_reasons == [
        "MIG mode is on: its instances serve the sandbox tier, not VFIO"
    ]
    assert sum(gpu.available for gpu in inventory.gpus) == 7
    domains = {gpu.nvlink_domain for gpu in inventory.gpus}
    assert domains == {"nvlink-0000:18:00.0"}
    assert {gpu.nvlink_source for gpu in inventory.gpus} == {"nvml"}
    assert all(gpu.nvswitches == HGX_H100_NVSWITCHES for gpu in inventory.gpus)


def test_nvml_gpu_missing_from_sysfs_is_noted(hgx: SysfsBuilder) -> None:
    gpus = hgx_nvml_gpus()
    gpus.append(FakeGpu(bus_id="00000000:F0:00.0", uuid="GPU-x", name="x", memory_total=1))

    inventory = read_inventory(
        SysfsRoot(hgx.root), nvml=_reader(FakePynvml(gpus)), runner=ready_runner()
    )

    assert inventory.nvml_status.errors == [
        "NVML reports a GPU at 0000:f0:00.0 that sysfs does not list"
    ]


def test_nvlink_bridge_pairs_form_two_domains(tmp_path: Path) -> None:
    """Four H100 NVL cards bridged in pairs: only NVML can see the bridges."""
    builder = SysfsBuilder(tmp_path)
    builder.add_driver("vfio-pci")
    cards = ["0000:17:00.0", "0000:31:00.0", "0000:b1:00.0", "0000:ca:00.0"]
    for group, bdf in enumerate(cards):
        builder.add_device(
            bdf,
            vendor=NVIDIA,
            device=0x2321,
            class_code=CLASS_3D,
            driver="nvidia",
            iommu_group=group,
            reset_methods=["flr", "bus"],
        )
    pairs = {cards[0]: cards[1], cards[1]: cards[0], cards[2]: cards[3], cards[3]: cards[2]}
    fake = [
        FakeGpu(
            bus_id=nvml_bus_id(bdf),
            uuid=f"GPU-{index}",
            name="NVIDIA H100 NVL",
            memory_total=94 * GIB,
            mig_mode=(0, 0),
            nvlinks=[nvml_bus_id(pairs[bdf])] * 6,
        )
        for index, bdf in enumerate(cards)
    ]

    sysfs_only = read_inventory(SysfsRoot(tmp_path), nvml=NoNvml(), runner=ready_runner())
    with_nvml = read_inventory(
        SysfsRoot(tmp_path), nvml=_reader(FakePynvml(fake)), runner=ready_runner()
    )

    assert {gpu.nvlink_domain for gpu in sysfs_only.gpus} == {None}
    assert [gpu.nvlink_domain for gpu in with_nvml.gpus] == [
        "nvlink-0000:17:00.0",
        "nvlink-0000:17:00.0",
        "nvlink-0000:b1:00.0",
        "nvlink-0000:b1:00.0",
    ]
    assert all(gpu.nvswitches == [] for gpu in with_nvml.gpus)
