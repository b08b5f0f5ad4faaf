"""``scripts/gpu_check.py``: run as a subprocess like ``make gpu-check``, and in-process
for the paths that need an NVML answer this machine cannot give."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest
from rich.console import Console

from hangar.devices.crosscheck import (
    check_device_nodes,
    check_firmware,
    parse_lspci,
    parse_nvidia_smi_q,
)
from hangar.devices.hostpaths import HostPaths
from hangar.devices.inventory import read_inventory
from hangar.devices.nvml import PynvmlReader
from hangar.devices.readiness import CommandResult, SubprocessRunner
from hangar.devices.sysfs import ReadOnlyWriter, SysfsRoot
from hangar.images.driver_bundle import DRIVER_BUNDLE_SETTING
from tests.conftest import REPO_ROOT
from tests.devices.conftest import ready_runner
from tests.devices.fake_pynvml import FakeGpu, FakePynvml, hgx_nvml_gpus, nvml_bus_id
from tests.devices.sysfs_fixture import (
    FIRECRACKER_H200,
    GIB,
    HGX_H100_GPUS,
    SysfsBuilder,
    build_firecracker_h200,
    build_hgx_h100,
    build_without_gpu,
)
from tests.fixtures.driver_bundle import DRIVER_VERSION, write_bundle

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
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up
    spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


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
    assert "skip MPS shares: no GPU here" in done.stdout


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

    done = _run("--sysfs-root", str(hgx.root), "--json", str(inventory_json), "--no-tools")

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


# --- cross-checks against lspci, nvidia-smi, /dev and modinfo (canned tool output)

GPU = next(iter(HGX_H100_GPUS))
LSPCI = f"""{GPU} 3D controller: NVIDIA Corporation GH100 [H100 SXM5 80GB] (rev a1)
\tSubsystem: NVIDIA Corporation Device 16c1
\tPhysical Slot: 1
\tControl: I/O- Mem+ BusMaster+ SpecCycle- MemWINV- VGASnoop- ParErr+ Stepping- SERR+
\tLatency: 0
\tInterrupt: pin A routed to IRQ 255
\tNUMA node: 0
\tIOMMU group: 13
\tRegion 0: Memory at e2000000 (32-bit, non-prefetchable) [size=16M]
\tRegion 1: Memory at 21b000000000 (64-bit, prefetchable) [size=128G]
\tRegion 3: Memory at 31b000000000 (64-bit, prefetchable) [size=32M]
\tCapabilities: [78] Express (v2) Endpoint, MSI 00
\t\tDevCap:\tMaxPayload 256 bytes, PhantFunc 0, Latency L0s unlimited, L1 <64us
\t\tLnkCap:\tPort #0, Speed 32GT/s, Width x16, ASPM not supported
\t\tLnkSta:\tSpeed 32GT/s, Width x16
\tCapabilities: [100 v1] Advanced Error Reporting
\t\tUESta:\tDLP- SDES- TLP- FCP- CmpltTO- CmpltAbrt- UnxCmplt- RxOF- MalfTLP-
\tKernel driver in use: nvidia
\tKernel modules: nvidiafb, nouveau, nvidia_drm, nvidia

"""
SMI = f"""
==============NVSMI LOG==============

Timestamp                                 : Mon Dec  1 10:00:00 2025
Driver Version                            : 550.90.07
CUDA Version                              : 12.4

Attached GPUs                             : 1
GPU 0000{GPU.upper()}
    Product Name                          : NVIDIA H100 80GB HBM3
    Module ID                             : 3
    MIG Mode
        Current                           : Disabled
        Pending                           : Disabled
    PCI
        Bus Id                            : 0000{GPU.upper()}
        GPU Link Info
            PCIe Generation
                Max                       : 5
                Current                   : 5
            Link Width
                Max                       : 16x
                Current                   : 16x
    ECC Mode
        Current                           : Enabled
        Pending                           : Enabled
    Remapped Rows
        Correctable Error                 : 0
        Uncorrectable Error               : 0
        Pending                           : No
        Remapping Failure Occurred        : No
    Fabric
        State                             : Completed
        Status                            : Success
"""


class CannedRunner:
    """Canned output of the read-only tools gpu-check runs; anything else exits 127."""

    def __init__(self, answers: dict[str, CommandResult]) -> None:
        self.answers = answers
        self.commands: list[list[str]] = []

    def run(self, argv: Sequence[str]) -> CommandResult:
        self.commands.append(list(argv))
        if argv[0] == "sh":  # the guest's node script, for real, on the fixture's /proc
            return SubprocessRunner().run(argv)
        return self.answers.get(argv[0], CommandResult(returncode=127, stderr="not found"))


def _nvml_for(hgx: SysfsBuilder) -> FakePynvml:
    gpus = hgx_nvml_gpus()
    gpus[0].module_id = 3
    gpus[0].fabric_state = 3
    return FakePynvml(gpus)


def _hgx_with_dev_nodes(tmp_path: Path) -> SysfsBuilder:
    builder = build_hgx_h100(tmp_path / "sys")
    dev = tmp_path / "dev"
    os.mknod(dev / "nvidiactl", stat.S_IFCHR | 0o666, os.makedev(195, 255))
    for minor in range(8):
        os.mknod(dev / f"nvidia{minor}", stat.S_IFCHR | 0o666, os.makedev(195, minor))
    return builder


def _checked(
    tmp_path: Path, lspci: str = LSPCI, smi: str = SMI, environ: dict[str, str] | None = None
) -> tuple[int, str, CannedRunner]:
    """Run every check on the HGX fixture; asserts they wrote nothing to its sysfs."""
    script = _load_script()
    builder = _hgx_with_dev_nodes(tmp_path)
    before = _tree_snapshot(builder.root)
    sysfs = SysfsRoot(builder.root, writer=ReadOnlyWriter())
    paths = HostPaths.beside(sysfs)
    nvml = _nvml_for(builder)
    inventory = read_inventory(
        sysfs, nvml=PynvmlReader(load=lambda: nvml), runner=ready_runner(), paths=paths
    )
    runner = CannedRunner(
        {
            "lspci": CommandResult(returncode=0, stdout=lspci),
            "nvidia-smi": CommandResult(returncode=0, stdout=smi),
            "modinfo": CommandResult(
                returncode=0,
                stdout=f"nvidia/{DRIVER_VERSION}/gsp_ga10x.bin\nnvidia/{DRIVER_VERSION}/gsp_tu10x.bin\n",
            ),
        }
    )
    tools = script.gather_tools(runner, paths, environ or {})
    console = Console(record=True, width=300, color_system=None)
    status = script.run_checks(inventory, sysfs, console, tools)
    assert _tree_snapshot(builder.root) == before, "gpu-check is read-only"
    return status, console.export_text(), runner


def test_hangars_reading_agrees_with_lspci_nvidia_smi_dev_and_the_bundle(
    tmp_path: Path,
) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"nvidia": b"module"})

    status, text, runner = _checked(tmp_path, environ={DRIVER_BUNDLE_SETTING: str(bundle)})

    lines = text.splitlines()
    gpu_line = next(line for line in lines if line.startswith("ok " + GPU))
    assert gpu_line == f"ok {GPU} h100-sxm (10de:2330)"
    assert "ok host: device nodes and firmware" in lines
    assert "    note: the bundle ships all 2 firmware files the driver names" in lines
    assert any("NVML: ECC enabled (pending enabled), MIG disabled" in line for line in lines)
    assert any("module id 3, fabric completed" in line for line in lines)
    assert any(f"IOMMU group 13: {GPU}; can be claimed" in line for line in lines)
    assert any("nodes hangar would make: nvidiactl 195 255 nvidia0 195 0" in line for line in lines)
    assert [c[0] for c in runner.commands] == ["lspci", "nvidia-smi", "sh", "modinfo"]
    assert status == 0, text
    assert "all checks passed for 8 GPU(s)" in text


def test_a_bar_size_hangar_misreads_is_a_failure(tmp_path: Path) -> None:
    _, text, _ = _checked(tmp_path, lspci=LSPCI.replace("[size=128G]", "[size=64G]"))

    assert f"failure: BAR1: hangar reads {128 * GIB} bytes, lspci shows {64 * GIB}" in text


def test_a_pending_mode_hangar_misses_is_a_failure(tmp_path: Path) -> None:
    smi = SMI.replace(
        "        Pending                           : Enabled",
        "        Pending                           : Disabled",
    )

    _, text, _ = _checked(tmp_path, smi=smi)

    assert "failure: pending ECC mode: hangar enabled, nvidia-smi Disabled" in text


def test_a_device_node_hangar_would_make_wrongly_is_a_failure(tmp_path: Path) -> None:
    _hgx = tmp_path / "dev"
    failures, _ = check_device_nodes(["nvidia0 195 0", "nvidia-uvm 237 0"], tmp_path)

    assert failures == [
        "/dev/nvidia-uvm (237:0) does not exist on this host",
        "/dev/nvidia0 (195:0) does not exist on this host",
    ]
    assert _hgx


def test_firmware_is_compared_only_for_the_same_driver_version(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", {"nvidia": b"m"})
    named = [f"nvidia/{DRIVER_VERSION}/gsp_ga10x.bin", f"nvidia/{DRIVER_VERSION}/gsp_gh100.bin"]

    assert check_firmware(named, DRIVER_VERSION, bundle / "firmware") == (
        [f"the bundle lacks firmware the driver loads: nvidia/{DRIVER_VERSION}/gsp_gh100.bin"],
        [],
    )
    assert check_firmware(named, "560.35.03", bundle / "firmware")[0] == []
    assert check_firmware([], None, None)[1] == [
        "modinfo names no firmware for nvidia (no module, or a pre-GSP driver)"
    ]


def test_the_lspci_and_nvidia_smi_parsers() -> None:
    [device] = parse_lspci(LSPCI).values()
    [gpu] = parse_nvidia_smi_q(SMI).values()

    assert device.bar_sizes == {0: 16 << 20, 1: 128 * GIB, 3: 32 << 20}
    assert device.bar64 == {0: False, 1: True, 3: True}
    assert (device.link_speed_gts, device.link_width, device.max_link_width) == (32.0, 16, 16)
    assert (device.numa_node, device.driver, device.aer) == (0, "nvidia", True)
    assert gpu.bdf == GPU
    assert gpu.get("MIG Mode", "Pending") == "Disabled"
    assert gpu.get("Link Width", "Max") == "16x"
    assert gpu.get("Fabric", "State") == "Completed"
    assert gpu.get("Module ID") == "3"


def _load_mps_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mps_check", SCRIPT.parent / "mps_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mps_check", module)
    spec.loader.exec_module(sys.modules["mps_check"])
    return sys.modules["mps_check"]


def test_the_mps_part_skips_with_a_reason_where_mps_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mps_check = _load_mps_check()
    builder = build_firecracker_h200(tmp_path)
    sysfs = SysfsRoot(builder.root, writer=ReadOnlyWriter())
    nvml = _h200_nvml((0, 0))
    inventory = read_inventory(sysfs, nvml=PynvmlReader(load=lambda: nvml), runner=ready_runner())
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    console = Console(record=True, width=200, color_system=None)

    failures = mps_check.run(inventory, console)

    assert failures == 0
    assert "skip MPS shares: nvidia-cuda-mps-control is not installed" in console.export_text()
    mig = _h200_nvml((1, 1))
    inventory = read_inventory(sysfs, nvml=PynvmlReader(load=lambda: mig), runner=ready_runner())
    assert (
        "no GPU outside MIG mode" in mps_check.asyncio.run(mps_check.mps_check(inventory)).skipped
    )


def test_the_mps_part_judges_the_machines_lines() -> None:
    judge = _load_mps_check().judge
    env = {"phase": "env", "cap_mib": 71000, "threads": "50", "visible": "GPU-1"}
    good = {
        "A": [
            env,
            {"phase": "within_cap", "ok": True, "allocated_mib": 56800},
            {"phase": "beyond_cap", "refused": True, "extra_mib": 16248, "error": "out of memory"},
        ],
        "B": [
            env,
            {"phase": "within_cap", "ok": True, "allocated_mib": 56800},
            {"phase": "after_a_refused", "ok": True},
        ],
    }
    failures, notes = judge(good)
    assert failures == []
    assert "machine B computed again after A's refusal: only A was refused" in notes
    leaky = {**good, "A": [*good["A"][:2], {"phase": "beyond_cap", "refused": False}]}
    assert any("past its cap" in failure for failure in judge(leaky)[0])
    hurt = {**good, "B": good["B"][:2]}
    assert any("machine B did not compute" in failure for failure in judge(hurt)[0])
    assert len(judge({})[0]) == 4
