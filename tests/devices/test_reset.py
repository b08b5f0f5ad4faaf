from __future__ import annotations

import pytest

from hangar.clock import ManualClock
from hangar.devices.reset import ResetOutcome, ScrubResult, reset_and_verify
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.vfio import bind_group_to_vfio, release_group
from tests.devices.kernel_sim import KernelSimulator, ResetFault
from tests.devices.sysfs_fixture import A10_AUDIO, A10_GPU, SysfsBuilder


def _bound_a10(builder: SysfsBuilder) -> tuple[SysfsRoot, KernelSimulator]:
    kernel = KernelSimulator(builder)
    sysfs = SysfsRoot(builder.root, writer=kernel)
    bind_group_to_vfio(sysfs, A10_GPU)
    kernel.writes.clear()
    return sysfs, kernel


def test_resets_every_passed_through_function_and_verifies_it(a10: SysfsBuilder) -> None:
    sysfs, kernel = _bound_a10(a10)
    clock = ManualClock()

    outcome = reset_and_verify(sysfs, A10_GPU, clock=clock)

    assert outcome.ok and not outcome.quarantine and outcome.reason is None
    assert kernel.writes == [
        (f"bus/pci/devices/{A10_GPU}/reset", "1"),
        (f"bus/pci/devices/{A10_AUDIO}/reset", "1"),
    ]
    gpu, audio = outcome.functions
    assert (gpu.config_vendor_id, gpu.config_device_id, gpu.driver_after) == (
        0x10DE,
        0x2236,
        "vfio-pci",
    )
    assert gpu.reset_methods == ["flr", "bus"] and audio.reset_methods == ["flr"]
    assert outcome.scrub == ScrubResult(
        method="verify-only",
        ok=True,
        detail="no memory scrub performed; relies on the function reset and its verification",
    )
    assert outcome.started_at == outcome.finished_at == clock.now()


def test_reset_can_run_again(a10: SysfsBuilder) -> None:
    sysfs, kernel = _bound_a10(a10)
    reset_and_verify(sysfs, A10_GPU)

    again = reset_and_verify(sysfs, A10_GPU)

    assert again.ok
    assert len(kernel.writes_to("/reset")) == 4


@pytest.mark.parametrize(
    ("fault", "problem"),
    [
        ("vanish", "device gone from the bus after reset"),
        ("unresponsive", "config space reads ffff after reset: the device does not respond"),
        ("unbound", "bound to no driver after reset, expected vfio-pci"),
        (
            "eio",
            "reset failed: writing '1' to bus/pci/devices/0000:3b:00.0/reset failed: "
            "Input/output error",
        ),
    ],
)
def test_a_failed_verify_means_quarantine(
    a10: SysfsBuilder, fault: ResetFault, problem: str
) -> None:
    sysfs, kernel = _bound_a10(a10)
    kernel.reset_faults[A10_GPU] = fault

    outcome = reset_and_verify(sysfs, A10_GPU)

    assert not outcome.ok and outcome.quarantine
    assert outcome.functions[0].problems[0] == problem
    assert outcome.reason is not None and outcome.reason.startswith(f"{A10_GPU}: {problem}")
    assert outcome.functions[1].problems == []  # the audio function came back fine
    assert outcome.scrub is None


def test_no_usable_reset_method_means_quarantine_without_writing(a10: SysfsBuilder) -> None:
    sysfs, kernel = _bound_a10(a10)
    (a10.root / f"bus/pci/devices/{A10_GPU}/reset_method").write_text("device_specific\n")

    outcome = reset_and_verify(sysfs, A10_GPU)

    assert outcome.quarantine
    assert outcome.functions[0].reset_written is False
    assert outcome.functions[0].problems == [
        "not reset: no FLR, PM or bus reset (reset_method lists device_specific)"
    ]
    assert (f"bus/pci/devices/{A10_GPU}/reset", "1") not in kernel.writes


def test_an_absent_gpu_means_quarantine(a10: SysfsBuilder) -> None:
    sysfs, kernel = _bound_a10(a10)
    a10.remove(A10_GPU)

    outcome = reset_and_verify(sysfs, A10_GPU)

    assert outcome.quarantine
    assert [(f.bdf, f.problems) for f in outcome.functions] == [(A10_GPU, ["device not present"])]
    assert kernel.writes == []


def test_reset_under_a_host_driver_is_refused_and_writes_nothing(a10: SysfsBuilder) -> None:
    """The old failure path reset a GPU with whatever driver was bound: under nvidia (no
    reset_prepare/reset_done hooks) that wedges the GPU. Now nothing is written."""
    kernel = KernelSimulator(a10)
    sysfs = SysfsRoot(a10.root, writer=kernel)
    binding = bind_group_to_vfio(sysfs, A10_GPU)
    release_group(sysfs, binding)
    kernel.writes.clear()
    originals = {f.bdf: f.original_driver for f in binding.functions}

    outcome = reset_and_verify(sysfs, A10_GPU, expected_driver=originals)

    assert outcome.quarantine
    assert [f.problems for f in outcome.functions] == [
        ["not reset: bound to the host driver nvidia, which cannot survive a reset"],
        ["not reset: bound to the host driver snd_hda_intel, which cannot survive a reset"],
    ]
    assert kernel.writes_to("/reset") == []
    assert kernel.hardware is not None and kernel.hardware.gpu(A10_GPU).corrupted == ""


def test_the_kernel_sim_wedges_a_gpu_reset_under_nvidia(a10: SysfsBuilder) -> None:
    """What the guard prevents, shown on the simulator: the reset write itself succeeds."""
    kernel = KernelSimulator(a10)

    kernel.write(a10.root, f"bus/pci/devices/{A10_GPU}/reset", "1")

    assert kernel.hardware is not None
    assert "nvidia" in kernel.hardware.gpu(A10_GPU).corrupted
    config = (a10.root / f"bus/pci/devices/{A10_GPU}/config").read_bytes()
    assert config[:4] == b"\xff\xff\xff\xff"


class FailingScrubber:
    def scrub(self, sysfs: SysfsRoot, gpu_bdf: str) -> ScrubResult:
        return ScrubResult(method="memory-pattern", ok=False, detail=f"{gpu_bdf} readback differs")


def test_a_failed_scrub_means_quarantine(a10: SysfsBuilder) -> None:
    sysfs, _ = _bound_a10(a10)

    outcome = reset_and_verify(sysfs, A10_GPU, scrubber=FailingScrubber())

    assert outcome.quarantine
    assert outcome.reason == f"scrub (memory-pattern) failed: {A10_GPU} readback differs"
    assert ResetOutcome.model_validate(outcome.model_dump()) == outcome
