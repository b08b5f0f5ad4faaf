"""``scripts/gpu_check.py``: run as a subprocess like ``make gpu-check``, and in-process
for the paths that need an NVML answer this machine cannot give."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console

from hangar.devices.inventory import read_inventory
from hangar.devices.nvml import PynvmlReader
from hangar.devices.sysfs import ReadOnlyWriter, SysfsRoot
from tests.conftest import REPO_ROOT
from tests.devices.conftest import ready_runner
from tests.devices.fake_pynvml import FakeGpu, FakePynvml, nvml_bus_id
from tests.devices.sysfs_fixture import (
    FIRECRACKER_H200,
    GIB,
    HGX_H100_GPUS,
    SysfsBuilder,
    build_firecracker_h200,
    build_without_gpu,
)

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree_snapshot(root: Path) -> dict[str, str]:
    """Every file's content hash and every link's target under ``root``."""
    snapshot = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                snapshot[key] = "-> " + os.readlink(path)
            elif path.is_file():
                snapshot[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snapshot


def _has_nvidia_device(sys_root: Path) -> bool:
    vendors = sys_root.glob("bus/pci/devices/*/vendor")
    return any(vendor.read_text().strip() == "0x10de" for vendor in vendors)


def test_on_this_machine_it_says_no_gpu_and_exits_2() -> None:
    if _has_nvidia_device(Path("/sys")):
        pytest.skip("this machine has an NVIDIA device")

    done = _run()

    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu-check: no NVIDIA GPU found on this host" in done.stdout


def test_a_host_without_nvidia_devices_exits_2(tmp_path: Path) -> None:
    build_without_gpu(tmp_path)

    done = _run("--sysfs-root", str(tmp_path), "--no-nvml")

    assert done.returncode == 2, done.stdout + done.stderr
    assert "No NVIDIA GPU found on this host." in done.stdout


def test_an_unreadable_sysfs_root_exits_3(tmp_path: Path) -> None:
    done = _run("--sysfs-root", str(tmp_path))

    assert done.returncode == 3
    assert "no PCI devices readable" in done.stdout


def test_gpus_without_nvml_fail_with_a_clear_list_and_nothing_changes(
    hgx: SysfsBuilder, tmp_path: Path
) -> None:
    before = _tree_snapshot(hgx.root)
    inventory_json = tmp_path / "inventory.json"

    done = _run("--sysfs-root", str(hgx.root), "--json", str(inventory_json))

    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    uuid_failures = [line for line in lines if "failure: no UUID from NVML" in line]
    assert len(uuid_failures) == 8
    assert sum("FAIL" in line and "h100-sxm (10de:2330)" in line for line in lines) == 8
    assert "16 check(s) failed" in done.stdout  # UUID and MIG mode, for each GPU
    assert _tree_snapshot(hgx.root) == before
    dumped = json.loads(inventory_json.read_text())
    assert [gpu["bdf"] for gpu in dumped["gpus"]] == list(HGX_H100_GPUS)


def _h200_nvml(mig_mode: tuple[int, int] | None) -> FakePynvml:
    return FakePynvml(
        [
            FakeGpu(
                bus_id=nvml_bus_id(FIRECRACKER_H200),
                uuid="GPU-5a3f0d1e-0000-4000-8000-000000000200",
                name="NVIDIA H200",
                memory_total=143771 * 1024**2,
                mig_mode=mig_mode,
                nvlinks=[None] * 18,
            )
        ],
        driver_version=b"560.35.03",
    )


def test_an_h200_in_a_firecracker_vm_passes_with_notes(tmp_path: Path) -> None:
    """The layout the real check meets: one H200, no NUMA affinity, no IOMMU group."""
    script = _load_script()
    builder = build_firecracker_h200(tmp_path)
    sysfs = SysfsRoot(builder.root, writer=ReadOnlyWriter())
    nvml = _h200_nvml((0, 0))
    inventory = read_inventory(sysfs, nvml=PynvmlReader(load=lambda: nvml), runner=ready_runner())
    console = Console(record=True, width=200, color_system=None)

    status = script.run_checks(inventory, sysfs, console)

    text = console.export_text()
    assert status == script.EXIT_OK, text
    assert f"ok {FIRECRACKER_H200} h200 (10de:2335)" in text
    assert "note: numa_node is -1: the kernel gives this GPU no NUMA affinity" in text
    assert "note: no IOMMU group (expected inside a VM)" in text
    assert "all checks passed for 1 GPU(s)" in text
    [gpu] = inventory.gpus
    assert gpu.nvlink_domain is None  # one SXM GPU alone: no domain to share


def test_check_gpu_fails_an_unknown_kind_and_a_missing_driver(tmp_path: Path) -> None:
    script = _load_script()
    builder = build_firecracker_h200(tmp_path)
    builder.unbind(FIRECRACKER_H200)
    (tmp_path / f"bus/pci/devices/{FIRECRACKER_H200}/device").write_text("0x2999\n")
    sysfs = SysfsRoot(builder.root, writer=ReadOnlyWriter())
    fake = _h200_nvml(None)
    inventory = read_inventory(sysfs, nvml=PynvmlReader(load=lambda: fake), runner=ready_runner())

    failures, _ = script.check_gpu(sysfs, inventory.gpus[0], inventory.nvml_status)

    assert failures == [
        "PCI id 10de:2999 is not in hangar's GPU catalog",
        "no driver bound",
    ]
    assert inventory.gpus[0].mig_mode == "unsupported"


def test_check_gpu_notes_memory_far_from_the_catalog(tmp_path: Path) -> None:
    script = _load_script()
    sysfs = SysfsRoot(build_firecracker_h200(tmp_path).root, writer=ReadOnlyWriter())
    fake = _h200_nvml((0, 0))
    fake.gpus[0].memory_total = 80 * GIB
    inventory = read_inventory(sysfs, nvml=PynvmlReader(load=lambda: fake), runner=ready_runner())

    failures, notes = script.check_gpu(sysfs, inventory.gpus[0], inventory.nvml_status)

    assert failures == []
    assert "NVML memory 80.0 GiB is far from the catalog's 141 GB" in notes
