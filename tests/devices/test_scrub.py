"""Scrubbing between tenants, on fixture hosts whose simulated GPUs keep their memory
across an FLR and clear it only after a secondary bus reset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hangar.devices.groups import group_of
from hangar.devices.reset import reset_and_verify
from hangar.devices.scrub import CommandScrubber, sbr_refusal, scrub
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.vfio import bind_group_to_vfio
from hangar.devices.worker import DeviceDeadlines
from hangar.errors import DeviceError
from tests.devices.gpu_hw import CLEAR, TENANT_DATA
from tests.devices.kernel_sim import KernelSimulator, tenant_used
from tests.devices.sysfs_fixture import (
    A10_AUDIO,
    A10_GPU,
    BROADCOM_PLX,
    CLASS_ETHERNET,
    HGX_H100_GPUS,
    INTEL,
    TWIN_GPUS,
    SysfsBuilder,
    build_a10_with_audio,
    build_two_gpus_one_group,
)

GPU = next(iter(HGX_H100_GPUS))


class StepClock:
    """A poll clock that moves only when polled: no test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses = 0

    def monotonic(self) -> float:
        return self.now

    def pause(self, seconds: float) -> None:
        self.now += seconds
        self.pauses += 1


def _on_vfio(builder: SysfsBuilder, gpu: str) -> tuple[SysfsRoot, KernelSimulator]:
    kernel = KernelSimulator(builder)
    sysfs = SysfsRoot(builder.root, writer=kernel)
    bind_group_to_vfio(sysfs, gpu)
    tenant_used(kernel, gpu)
    kernel.writes.clear()
    return sysfs, kernel


def test_flr_alone_leaves_the_tenants_data_in_gpu_memory(hgx: SysfsBuilder) -> None:
    """The defect: the old handoff's reset is an FLR and its scrubber only verifies."""
    sysfs, kernel = _on_vfio(hgx, GPU)

    outcome = reset_and_verify(sysfs, GPU)

    assert outcome.ok and outcome.scrub is not None and outcome.scrub.method == "verify-only"
    assert kernel.hardware is not None
    assert kernel.hardware.gpu(GPU).resets == ["flr"]
    assert kernel.hardware.gpu(GPU).vram == TENANT_DATA


def test_a_lone_gpu_gets_a_bus_reset_and_the_firmware_clears_its_memory(
    hgx: SysfsBuilder,
) -> None:
    sysfs, kernel = _on_vfio(hgx, GPU)
    clock = StepClock()

    outcome = scrub(sysfs, group_of(sysfs, GPU), clock=clock)

    assert outcome.method == "secondary-bus-reset" and outcome.via == "reset_method=bus"
    assert kernel.writes == [
        (f"bus/pci/devices/{GPU}/reset_method", "bus"),
        (f"bus/pci/devices/{GPU}/reset", "1"),
        (f"bus/pci/devices/{GPU}/reset_method", "flr bus"),
    ]
    [cleared] = outcome.memory_clear
    assert (cleared.boot_register, cleared.clear_register & 1) == (0xFF, 1)  # Hopper FSP
    assert kernel.hardware is not None
    assert kernel.hardware.gpu(GPU).vram == CLEAR
    assert kernel.hardware.gpu(GPU).resets == ["sbr"]
    assert clock.pauses == 0


def test_with_reset_subordinate_the_port_resets_gpu_and_companion_together(
    tmp_path: Path,
) -> None:
    builder = build_a10_with_audio(tmp_path / "sys", reset_subordinate=True)
    sysfs, kernel = _on_vfio(builder, A10_GPU)

    outcome = scrub(sysfs, group_of(sysfs, A10_GPU), clock=StepClock())

    assert outcome.via == "reset_subordinate" and outcome.port == "0000:3a:00.0"
    assert kernel.writes == [("bus/pci/devices/0000:3a:00.0/reset_subordinate", "1")]
    assert kernel.hardware is not None and kernel.hardware.gpu(A10_GPU).vram == CLEAR
    [cleared] = outcome.memory_clear
    assert cleared.boot_register == 0x3FF  # Ampere reports boot done in 0x118234


def test_a_multifunction_slot_without_reset_subordinate_cannot_be_scrubbed_by_sbr(
    a10: SysfsBuilder,
) -> None:
    sysfs, kernel = _on_vfio(a10, A10_GPU)

    with pytest.raises(DeviceError) as raised:
        scrub(sysfs, group_of(sysfs, A10_GPU), clock=StepClock())

    assert raised.value.fields["reason"] == "sbr_refused"
    assert "no trusted scrubber" in raised.value.message
    assert "an FLR does not clear GPU memory" in raised.value.message
    assert kernel.writes == []


def test_the_bus_reset_is_refused_when_another_device_shares_the_bus(tmp_path: Path) -> None:
    """As libvirt refuses it: a NIC in its own group below the same switch."""
    builder = build_two_gpus_one_group(tmp_path / "sys", reset_subordinate=True)
    port = builder.add_bridge(
        "0000:42:18.0",
        parent="pci0000:40/0000:40:01.0/0000:41:00.0",
        numa_node=0,
        iommu_group=51,
        vendor=BROADCOM_PLX,
        device=0x8747,
    )
    builder.add_device(
        "0000:45:00.0",
        vendor=INTEL,
        device=0x1521,
        class_code=CLASS_ETHERNET,
        parent=port,
        driver="igb",
        iommu_group=52,
        reset_methods=["flr"],
    )
    sysfs, kernel = _on_vfio(builder, TWIN_GPUS[0])
    group = group_of(sysfs, TWIN_GPUS[0])

    assert sbr_refusal(sysfs, group) == (
        "other devices share the bus below 0000:41:00.0: 0000:42:18.0 (pcieport), "
        "0000:45:00.0 (igb)"
    )
    with pytest.raises(DeviceError, match="other devices share the bus"):
        scrub(sysfs, group, clock=StepClock())
    assert kernel.writes == []


def test_two_gpus_in_one_group_are_reset_together_at_the_switch(tmp_path: Path) -> None:
    builder = build_two_gpus_one_group(tmp_path / "sys", reset_subordinate=True)
    sysfs, kernel = _on_vfio(builder, TWIN_GPUS[0])
    tenant_used(kernel, *TWIN_GPUS)

    outcome = scrub(sysfs, group_of(sysfs, TWIN_GPUS[0]), clock=StepClock())

    assert outcome.via == "reset_subordinate" and outcome.port == "0000:41:00.0"
    assert [c.bdf for c in outcome.memory_clear] == TWIN_GPUS
    assert kernel.hardware is not None
    assert {kernel.hardware.gpu(bdf).vram for bdf in TWIN_GPUS} == {CLEAR}


def test_never_scrubs_under_a_host_driver(hgx: SysfsBuilder) -> None:
    kernel = KernelSimulator(hgx)
    sysfs = SysfsRoot(hgx.root, writer=kernel)

    with pytest.raises(DeviceError) as raised:
        scrub(sysfs, group_of(sysfs, GPU), clock=StepClock())

    assert raised.value.fields["reason"] == "host_driver_bound"
    assert raised.value.fields["drivers"] == {GPU: "nvidia"}
    assert kernel.writes == []
    assert kernel.hardware is not None and kernel.hardware.gpu(GPU).corrupted == ""


def test_a_memory_clear_that_never_finishes_times_out(hgx: SysfsBuilder) -> None:
    sysfs, kernel = _on_vfio(hgx, GPU)
    assert kernel.hardware is not None
    with kernel.hardware.edit(GPU) as gpu:
        gpu.memory_clear_stuck = True
    clock = StepClock()

    with pytest.raises(DeviceError) as raised:
        scrub(
            sysfs, group_of(sysfs, GPU), deadlines=DeviceDeadlines(memory_clear_s=5.0), clock=clock
        )

    assert raised.value.fields["reason"] == "memory_clear_timeout"
    assert raised.value.fields["timed_out"] is True
    assert clock.now == pytest.approx(5.0), "polled until the deadline, not past it"
    assert kernel.hardware.gpu(GPU).vram == TENANT_DATA


def _scrubber_command(tmp_path: Path, report: dict[str, int]) -> list[str]:
    script = tmp_path / "scrubber.py"
    script.write_text(
        "import json, sys\n"
        "assert sys.argv[1].startswith('--gpu=0000:')\n"
        f"print(json.dumps({report!r}))\n"
    )
    return [sys.executable, str(script), "--gpu={bdf}"]


def test_a_trusted_scrubber_runs_when_the_bus_reset_is_refused(
    a10: SysfsBuilder, tmp_path: Path
) -> None:
    sysfs, kernel = _on_vfio(a10, A10_GPU)
    full = {
        "bytes_total": 24 << 30,
        "bytes_written": 24 << 30,
        "samples_checked": 4096,
        "mismatches": 0,
    }
    scrubber = CommandScrubber(_scrubber_command(tmp_path, full), name="cuda-memset")

    outcome = scrub(sysfs, group_of(sysfs, A10_GPU), clock=StepClock(), trusted=scrubber)

    assert outcome.method == "trusted-scrubber" and outcome.via == "cuda-memset"
    assert outcome.scrubber_report == {"bytes_written": 24 << 30, "samples_checked": 4096}
    assert outcome.sbr_refused is not None and "reset_subordinate" in outcome.sbr_refused
    assert kernel.writes == []


@pytest.mark.parametrize(
    ("report", "problem"),
    [
        (
            {"bytes_total": 100, "bytes_written": 50, "samples_checked": 8, "mismatches": 0},
            "wrote 50 of 100 bytes",
        ),
        (
            {"bytes_total": 100, "bytes_written": 100, "samples_checked": 0, "mismatches": 0},
            "read nothing back",
        ),
        (
            {"bytes_total": 100, "bytes_written": 100, "samples_checked": 8, "mismatches": 2},
            "2 of 8 samples read back wrong",
        ),
    ],
)
def test_a_scrubber_report_short_of_a_full_clear_fails(
    a10: SysfsBuilder, tmp_path: Path, report: dict[str, int], problem: str
) -> None:
    sysfs, _ = _on_vfio(a10, A10_GPU)
    scrubber = CommandScrubber(_scrubber_command(tmp_path, report))

    with pytest.raises(DeviceError, match=problem) as raised:
        scrub(sysfs, group_of(sysfs, A10_GPU), clock=StepClock(), trusted=scrubber)

    assert raised.value.fields["reason"] == "scrubber_failed"


def test_a_scrubber_that_prints_no_report_fails(a10: SysfsBuilder, tmp_path: Path) -> None:
    sysfs, _ = _on_vfio(a10, A10_GPU)
    scrubber = CommandScrubber([sys.executable, "-c", "print('done')"])

    with pytest.raises(DeviceError, match="printed no report"):
        scrub(sysfs, group_of(sysfs, A10_GPU), clock=StepClock(), trusted=scrubber)


def test_an_unknown_kind_is_not_trusted_to_clear_its_own_memory(tmp_path: Path) -> None:
    builder = build_a10_with_audio(tmp_path / "sys", reset_subordinate=True)
    (builder.root / f"bus/pci/devices/{A10_GPU}/device").write_text("0x2684\n")
    config = builder.root / f"bus/pci/devices/{A10_GPU}/config"
    config.write_bytes(config.read_bytes()[:2] + b"\x84\x26" + config.read_bytes()[4:])
    sysfs, kernel = _on_vfio(builder, A10_GPU)

    with pytest.raises(DeviceError, match=r"does not know how 0000:3b:00\.0 reports"):
        scrub(sysfs, group_of(sysfs, A10_GPU), clock=StepClock())
    assert kernel.writes == []
    assert json.loads((tmp_path / "gpu-hw.json").read_text())[A10_GPU]["vram"] == TENANT_DATA
    assert A10_AUDIO  # the companion stays bound with it
