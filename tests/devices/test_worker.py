"""Device operations in a killable worker: a write that blocks is killed at its deadline and
reported, never waited for. Deadlines here are short on purpose; nothing asserts on time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hangar.devices.handoff import check_not_held
from hangar.devices.hostpaths import HostPaths
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.vfio import bind_group_to_vfio
from hangar.devices.worker import (
    DeviceDeadlines,
    InlineRunner,
    RunnerWriter,
    WorkerRunner,
    killable_sysfs,
)
from hangar.errors import DeviceError
from tests.conftest import REPO_ROOT
from tests.devices.kernel_sim import KernelSimulator, SimulatedHang
from tests.devices.sysfs_fixture import A10_GPU, HGX_H100_GPUS, SysfsBuilder

SIM_TARGET = "tests.devices.kernel_sim:write_in_worker"
FIRST_HGX_GPU = next(iter(HGX_H100_GPUS))


def _worker() -> WorkerRunner:
    return WorkerRunner(python_path=[REPO_ROOT], kill_grace_s=10.0)


def test_a_write_runs_in_the_worker(a10: SysfsBuilder) -> None:
    sysfs = killable_sysfs(a10.root, runner=_worker())

    sysfs.write(f"bus/pci/devices/{A10_GPU}/driver_override", "vfio-pci")

    assert sysfs.read_text(f"bus/pci/devices/{A10_GPU}/driver_override") == "vfio-pci"


def test_a_kernel_error_comes_back_with_its_fields(a10: SysfsBuilder) -> None:
    sysfs = killable_sysfs(a10.root, runner=_worker())

    with pytest.raises(DeviceError) as raised:
        sysfs.write("bus/pci/drivers/absent/unbind", A10_GPU)

    assert raised.value.fields["errno"] == 2
    assert raised.value.fields["path"] == "bus/pci/drivers/absent/unbind"
    assert "No such file or directory" in raised.value.message


def test_a_write_that_blocks_is_killed_at_its_deadline(a10: SysfsBuilder) -> None:
    """The device's ``reset`` is a FIFO nobody reads: opening it blocks, as a reset that
    polls a dead device does."""
    reset = a10.root / f"bus/pci/devices/{A10_GPU}/reset"
    reset.unlink()
    os.mkfifo(reset)
    sysfs = killable_sysfs(a10.root, DeviceDeadlines(reset_s=0.5), runner=_worker())

    with pytest.raises(DeviceError) as raised:
        sysfs.write(f"bus/pci/devices/{A10_GPU}/reset", "1")

    fields = raised.value.fields
    assert fields["timed_out"] is True and fields["stuck"] is False and fields["retry"] is False
    assert fields["timeout_s"] == 0.5
    assert "no answer within 0.5 s; the worker was killed" in raised.value.message
    with pytest.raises(ProcessLookupError):
        os.kill(fields["pid"], 0)  # reaped: gone


def test_each_attribute_gets_its_own_deadline() -> None:
    deadlines = DeviceDeadlines()
    assert deadlines.for_attribute("bus/pci/drivers/nvidia/unbind") == deadlines.unbind_s
    assert deadlines.for_attribute("bus/pci/drivers_probe") == deadlines.probe_s
    assert deadlines.for_attribute("bus/pci/devices/x/reset") == deadlines.reset_s
    assert deadlines.for_attribute("bus/pci/devices/x/reset_subordinate") == 120.0
    assert deadlines.for_attribute("bus/pci/devices/x/driver_override") == deadlines.write_s


def test_in_process_an_nvidia_unbind_under_a_holder_would_hang(hgx: SysfsBuilder) -> None:
    """The defect, on the simulator: nvidia-persistenced holds the GPU, the old bind path
    writes the unbind anyway and the kernel never returns."""
    hgx.add_holder(1234, "nvidia-persistenced", "/dev/nvidia0", "/dev/nvidiactl")
    sysfs = SysfsRoot(hgx.root, writer=KernelSimulator(hgx))

    with pytest.raises(SimulatedHang, match="waits for nvidia-persistenced"):
        bind_group_to_vfio(sysfs, FIRST_HGX_GPU)


def test_holders_are_checked_before_any_unbind(hgx: SysfsBuilder) -> None:
    hgx.add_holder(1234, "nvidia-persistenced", "/dev/nvidia0")
    kernel = KernelSimulator(hgx)

    with pytest.raises(DeviceError) as raised:
        check_not_held(
            HostPaths.beside(hgx.root), SysfsRoot(hgx.root, writer=kernel), [FIRST_HGX_GPU]
        )

    assert raised.value.fields["reason"] == "device_held"
    assert raised.value.fields["retry"] is True
    assert raised.value.fields["holders"] == [
        {"pid": 1234, "command": "nvidia-persistenced", "node": "/dev/nvidia0"}
    ]
    assert kernel.writes == []


def test_through_the_worker_a_held_unbind_is_killed_and_the_gpu_stays_put(
    hgx: SysfsBuilder,
) -> None:
    hgx.add_holder(4321, "dcgm", "/dev/nvidia0")
    kernel = KernelSimulator(hgx)
    kernel.save()
    sysfs = SysfsRoot(
        hgx.root, writer=RunnerWriter(_worker(), DeviceDeadlines(unbind_s=1.0), SIM_TARGET)
    )

    with pytest.raises(DeviceError) as raised:
        bind_group_to_vfio(sysfs, FIRST_HGX_GPU)

    assert raised.value.fields["timed_out"] is True
    assert "to bus/pci/drivers/nvidia/unbind: no answer within 1 s" in raised.value.message
    assert os.readlink(hgx.root / f"bus/pci/devices/{FIRST_HGX_GPU}/driver").endswith("nvidia")


def test_without_holders_the_worker_binds_through_the_simulated_kernel(
    hgx: SysfsBuilder,
) -> None:
    kernel = KernelSimulator(hgx)
    kernel.save()
    sysfs = SysfsRoot(hgx.root, writer=RunnerWriter(_worker(), target=SIM_TARGET))

    binding = bind_group_to_vfio(sysfs, FIRST_HGX_GPU)

    assert binding.changed
    assert os.readlink(hgx.root / f"bus/pci/devices/{FIRST_HGX_GPU}/driver").endswith("vfio-pci")
    assert not (Path(hgx.proc) / "driver/nvidia/gpus" / FIRST_HGX_GPU).exists()


def test_the_inline_runner_calls_the_target_here(a10: SysfsBuilder) -> None:
    InlineRunner().call(
        "hangar.devices.sysfs:write_attribute",
        {
            "root": str(a10.root),
            "relpath": f"bus/pci/devices/{A10_GPU}/driver_override",
            "data": "vfio-pci",
        },
        timeout_s=1.0,
        what="test",
    )

    assert (a10.root / f"bus/pci/devices/{A10_GPU}/driver_override").read_text() == "vfio-pci"


def test_a_bad_target_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="not module:function"):
        InlineRunner().call("nonsense", {}, timeout_s=1.0, what="test")
