"""The group handoff end to end on fixture hosts: reaped VM, driver guard, scrub, staged
settings put back, health, host drivers back; each failure a quarantine with a reason."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from hangar.devices.groups import group_of
from hangar.devices.handoff import (
    GroupClaim,
    HandoffContext,
    begin_claim,
    bind_claim,
    run_handoff,
)
from hangar.devices.hostpaths import HostPaths
from hangar.devices.settings import AdminToolsSettings, NvmlSettings
from hangar.devices.sysfs import SysfsRoot
from hangar.devices.worker import DeviceDeadlines, InlineRunner, RunnerWriter, WorkerRunner
from hangar.devices.xid import parse_xid
from hangar.errors import DeviceError
from tests.conftest import REPO_ROOT
from tests.devices.gpu_hw import CLEAR, SYSFS_ENV, Hardware
from tests.devices.kernel_sim import KernelSimulator, tenant_used
from tests.devices.sysfs_fixture import HGX_H100_GPUS, SysfsBuilder
from tests.devices.test_scrub import StepClock
from tests.devices.test_settings import FAKE_NVML, FAKE_TOOLS

GPU = next(iter(HGX_H100_GPUS))
GROUP = 13  # the fixture's group of 0000:18:00.0


@dataclass
class Host:
    builder: SysfsBuilder
    kernel: KernelSimulator
    sysfs: SysfsRoot
    paths: HostPaths
    hardware: Hardware

    def context(self, **changes: object) -> HandoffContext:
        fields: dict[str, object] = {
            "sysfs": self.sysfs,
            "paths": self.paths,
            "settings_sources": [
                NvmlSettings(InlineRunner(), module=FAKE_NVML),
                AdminToolsSettings(FAKE_TOOLS),
            ],
            "nvml_runner": InlineRunner(),
            "nvml_module": FAKE_NVML,
            "clock": StepClock(),
        }
        return HandoffContext(**(fields | changes))  # type: ignore[arg-type]

    def driver(self, bdf: str) -> str:
        return os.readlink(self.builder.root / "bus/pci/devices" / bdf / "driver").rsplit("/")[-1]


@pytest.fixture
def host(hgx: SysfsBuilder, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    monkeypatch.setenv(SYSFS_ENV, str(hgx.root))
    kernel = KernelSimulator(hgx)
    assert hgx.host is not None
    yield Host(
        hgx,
        kernel,
        SysfsRoot(hgx.root, writer=kernel),
        HostPaths.beside(hgx.root),
        Hardware(hgx.host),
    )


def _claimed(host: Host) -> GroupClaim:
    claim = begin_claim(host.sysfs, host.paths, group_of(host.sysfs, GPU))
    claim = bind_claim(host.sysfs, host.paths, claim)
    tenant_used(host.kernel, GPU)
    return claim


def test_a_handoff_clears_memory_puts_staged_settings_back_and_returns_the_gpu(
    host: Host,
) -> None:
    claim = _claimed(host)
    assert claim.iommu_group == GROUP and claim.functions == [GPU]
    with host.hardware.edit(GPU) as gpu:  # what the tenant staged from inside its VM
        gpu.ecc = ["enabled", "disabled"]
        gpu.mig = ["disabled", "enabled"]

    report = run_handoff(host.context(), claim)

    assert [s.via for s in report.scrubs] == ["reset_method=bus", "reset_method=bus"]
    assert report.restore_cycles == 1, "the first bus reset applied the tenant's modes"
    state = host.hardware.gpu(GPU)
    assert (state.vram, state.ecc, state.mig) == (CLEAR, ["enabled"] * 2, ["disabled"] * 2)
    assert state.resets == ["sbr", "sbr"]
    assert host.driver(GPU) == "nvidia"
    assert all(staged.mismatches(host.context().defaults) == [] for staged in report.settings_after)
    assert report.findings == {GPU: []}


def test_an_untouched_gpu_takes_one_reset(host: Host) -> None:
    report = run_handoff(host.context(), _claimed(host))

    assert report.restore_cycles == 0
    assert host.hardware.gpu(GPU).resets == ["sbr"]


def test_the_handoff_waits_for_the_vfio_group_to_close(host: Host) -> None:
    claim = _claimed(host)
    host.builder.add_holder(777, "qemu-system-x86", f"/dev/vfio/{GROUP}")
    host.kernel.writes.clear()

    with pytest.raises(DeviceError) as raised:
        run_handoff(host.context(), claim)

    assert raised.value.fields["reason"] == "vfio_group_open"
    assert raised.value.fields["retry"] is True
    assert host.kernel.writes == []


def test_a_group_rebound_to_its_host_driver_is_never_reset(host: Host) -> None:
    """No stored binding and the GPU on nvidia: the old failure path reset it there."""
    claim = begin_claim(host.sysfs, host.paths, group_of(host.sysfs, GPU))

    with pytest.raises(DeviceError) as raised:
        run_handoff(host.context(), claim)

    assert raised.value.fields["reason"] == "host_driver_bound"
    assert host.kernel.writes_to("/reset") == []
    assert host.hardware.gpu(GPU).corrupted == ""


def test_a_holder_on_the_host_stops_the_restore_cycle_before_any_unbind(host: Host) -> None:
    claim = _claimed(host)
    with host.hardware.edit(GPU) as gpu:
        gpu.ecc = ["enabled", "disabled"]
    # nvidia-persistenced grabs every GPU the nvidia driver takes back.
    host.builder.add_holder(99, "nvidia-persistenced", "/dev/nvidia0")

    with pytest.raises(DeviceError) as raised:
        run_handoff(host.context(), claim)

    assert raised.value.fields["reason"] == "device_held"
    assert host.driver(GPU) == "nvidia"
    assert host.kernel.writes_to("/unbind")[-1:] == [("bus/pci/drivers/vfio-pci/unbind", GPU)]


def test_new_fatal_aer_errors_during_the_tenancy_quarantine(host: Host) -> None:
    claim = _claimed(host)
    host.builder.set_aer(GPU, "aer_dev_fatal", CmpltTO=1)

    with pytest.raises(DeviceError) as raised:
        run_handoff(host.context(), claim)

    assert raised.value.fields["reason"] == "unhealthy"
    assert "aer-fatal" in raised.value.message


def test_a_pending_row_remap_quarantines(host: Host) -> None:
    claim = _claimed(host)
    with host.hardware.edit(GPU) as gpu:
        gpu.uncorrectable_ecc = 1
        gpu.recovery_action = 1

    with pytest.raises(DeviceError) as raised:
        run_handoff(host.context(), claim)

    assert raised.value.fields["findings"] == [
        f"{GPU}: ecc: 1 uncorrectable ECC error(s)",
        f"{GPU}: recovery-action: the driver asks for gpu-reset",
    ]


def test_an_xid_the_guest_forwarded_quarantines(host: Host) -> None:
    claim = _claimed(host)
    xid = parse_xid(
        "NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus.", {"0000:01:00.0": GPU}
    )
    assert xid is not None

    with pytest.raises(DeviceError, match="xid-79"):
        run_handoff(host.context(), claim, xids=[xid])


def test_settings_that_do_not_come_back_quarantine(host: Host) -> None:
    claim = _claimed(host)
    with host.hardware.edit(GPU) as gpu:
        gpu.ppcie = ["off", "on"]  # staged for the next reset: the scrub applies it

    class StuckTools(AdminToolsSettings):
        def stage(self, bdf: str, name: str, value: str) -> None:  # type: ignore[override]
            pass  # firmware that ignores the request

    with pytest.raises(DeviceError) as raised:
        run_handoff(host.context(settings_sources=[StuckTools(FAKE_TOOLS)]), claim)

    assert raised.value.fields["reason"] == "settings_mismatch"
    assert raised.value.fields["mismatches"] == ["ppcie: current on, pending on, default off"]


def test_claims_refuse_held_and_unusable_groups(host: Host) -> None:
    host.builder.add_holder(5, "dcgm", "/dev/nvidia0")
    group = group_of(host.sysfs, GPU)

    with pytest.raises(DeviceError) as held:
        begin_claim(host.sysfs, host.paths, group)
    (host.builder.device_dir(GPU) / "reset_method").write_text("\n")
    with pytest.raises(DeviceError) as unusable:
        begin_claim(host.sysfs, host.paths, group_of(host.sysfs, GPU))

    assert held.value.fields["reason"] == "device_held"
    assert unusable.value.fields["reason"] == "group_unusable"


def test_the_whole_handoff_runs_through_killable_workers(
    hgx: SysfsBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the agent runs it: every sysfs write and NVML call in a worker process."""
    monkeypatch.setenv(SYSFS_ENV, str(hgx.root))
    kernel = KernelSimulator(hgx)
    kernel.save()
    worker = WorkerRunner(python_path=[REPO_ROOT])
    sysfs = SysfsRoot(
        hgx.root,
        writer=RunnerWriter(worker, DeviceDeadlines(), "tests.devices.kernel_sim:write_in_worker"),
    )
    paths = HostPaths.beside(hgx.root)
    claim = bind_claim(sysfs, paths, begin_claim(sysfs, paths, group_of(sysfs, GPU)))
    tenant_used(kernel, GPU)
    context = HandoffContext(
        sysfs=sysfs,
        paths=paths,
        settings_sources=[NvmlSettings(worker, module=FAKE_NVML)],
        nvml_runner=worker,
        nvml_module=FAKE_NVML,
        clock=StepClock(),
    )

    report = run_handoff(context, claim)

    assert report.restore_cycles == 0
    assert kernel.hardware is not None and kernel.hardware.gpu(GPU).vram == CLEAR
    assert ("bus/pci/devices/" + GPU + "/reset", "1") in kernel.logged_writes()
