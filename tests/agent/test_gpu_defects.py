"""The GPU as the hostile peripheral, through the agent: each way a GPU betrays the next
tenant or hangs the host, on fixture hosts that model it (tests/devices/kernel_sim.py,
gpu_hw.py), run end to end by the real agent.

- a device write that blocks forever is killed at its deadline, and the agent goes on;
- a GPU held on the host (nvidia-persistenced, DCGM) is not claimed until it is let go;
- a group put back on its host driver is never reset there;
- an FLR never counts as a scrub: a bus reset and the firmware's memory clear, or a trusted
  scrubber; a group neither can clear is never offered;
- settings a tenant staged or changed are put back, or the group is quarantined;
- health beyond the ids: link, AER, NVML's memory state, the guest's Xids;
- two GPUs in one IOMMU group go to one tenant together, never apart;
- the handoff waits for the VFIO group to close;
- guest memory off 1 GiB pages is a machine event, never silent.
NVLink partitions and crash safety are in test_gpus.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hangar.clock import SystemClock
from hangar.devices.settings import AdminToolsSettings, NvmlSettings, SettingName
from hangar.devices.sysfs import SysfsWriter
from hangar.devices.worker import DeviceDeadlines, InlineRunner
from hangar.model.gpu import GpuState
from hangar.model.machine import MachineState
from hangar.model.run import StopRequest
from tests.agent.gpu_fixture import (
    HGX_GROUPS,
    GpuHost,
    Platform,
    fixture_host,
    scrubber_command,
    settle,
    started,
    stopped,
)
from tests.devices.kernel_sim import tenant_used
from tests.devices.sysfs_fixture import (
    A10_AUDIO,
    A10_GPU,
    GEN5,
    HGX_H100_GPUS,
    TWIN_GPUS,
    TWIN_GROUP,
    SysfsBuilder,
    build_a10_with_audio,
    build_two_gpus_one_group,
)
from tests.devices.test_settings import FAKE_NVML, FAKE_TOOLS
from tests.vmm.gpu_host import write_host_memory
from tests.vmm.test_gpu_topology import values_of

FIRST = next(iter(HGX_H100_GPUS))
"""The GPU a lone machine gets on an empty HGX host (minor 0 under the nvidia driver)."""
RESETS = ("/reset", "/reset_method", "/reset_subordinate")


class HolderAppears:
    """nvidia-persistenced starts between hangar's check and its unbind of the GPU."""

    def __init__(self, inner: SysfsWriter, builder: SysfsBuilder) -> None:
        self.inner = inner
        self.builder = builder

    def write(self, root: Path, relpath: str, data: str) -> None:
        if relpath == "bus/pci/drivers/nvidia/unbind" and not (self.builder.proc / "99").exists():
            self.builder.add_holder(99, "nvidia-persistenced", "/dev/nvidia0")
        self.inner.write(root, relpath, data)


async def test_an_unbind_that_never_returns_is_killed_and_the_group_goes_back(
    gpu_host: GpuHost, sleeping_platform: Platform
) -> None:
    gpu_host.killable(DeviceDeadlines(unbind_s=2.0))
    assert gpu_host.writer is not None
    gpu_host.writer = HolderAppears(gpu_host.writer, gpu_host.builder)

    machine_id = await started(gpu_host, sleeping_platform)

    machine = gpu_host.machine(machine_id)
    assert machine.state == MachineState.FAILED
    assert "no answer within 2 s; the worker was killed" in machine.failure_reason
    [create] = gpu_host.stores.runs.list_runs(machine_id)
    assert create.progress.devices["failure"]["timed_out"] is True
    # The claim never reached launch: the group only goes back, free, with no reset.
    assert gpu_host.state(FIRST) == GpuState.FREE
    assert gpu_host.driver_of(FIRST) == "nvidia"
    override = gpu_host.builder.root / "bus/pci/devices" / FIRST / "driver_override"
    assert override.read_text().strip() == "(null)"
    assert not [w for w in gpu_host.writes() if w[0].endswith(RESETS)]


async def test_a_gpu_held_on_the_host_is_not_claimed_until_it_is_let_go(
    gpu_host: GpuHost, sleeping_platform: Platform
) -> None:
    gpu_host.builder.add_holder(99, "nvidia-persistenced", "/dev/nvidia0")

    refused = await started(gpu_host, sleeping_platform)

    machine = gpu_host.machine(refused)
    assert machine.state == MachineState.FAILED
    assert "nvidia-persistenced (pid 99) holds /dev/nvidia0" in machine.failure_reason
    [create] = gpu_host.stores.runs.list_runs(refused)
    assert [retry.step for retry in create.progress.retries] == ["claim_gpu_groups"] * 3
    assert gpu_host.state(FIRST) == GpuState.FREE
    assert gpu_host.kernel.writes == [], "nothing was unbound, nothing reset"

    gpu_host.builder.remove_holder(99)
    machine_id = await started(gpu_host, sleeping_platform)
    assert gpu_host.machine(machine_id).state == MachineState.STARTED
    assert gpu_host.held(machine_id) == [FIRST]


async def test_a_group_put_back_on_its_host_driver_is_never_reset_there(
    gpu_host: GpuHost, sleeping_platform: Platform
) -> None:
    machine_id = await started(gpu_host, sleeping_platform)
    # Something on the host hands the GPU back to nvidia while the tenant has it.
    gpu_host.builder.unbind(FIRST)
    (gpu_host.builder.device_dir(FIRST) / "driver_override").write_text("(null)\n")
    gpu_host.builder.bind(FIRST, "nvidia")
    gpu_host.kernel.writes.clear()

    await stopped(gpu_host, sleeping_platform, machine_id)

    assert gpu_host.state(FIRST) == GpuState.QUARANTINED
    [quarantined] = [e for e in gpu_host.events(FIRST) if e.action == "quarantined"]
    assert quarantined.detail["code"] == "host_driver_bound"
    assert not [w for w in gpu_host.kernel.writes if w[0].endswith(RESETS)]
    assert gpu_host.hardware.gpu(FIRST).corrupted == ""


async def test_a_memory_clear_that_never_finishes_quarantines_at_its_deadline(
    gpu_host: GpuHost, sleeping_platform: Platform
) -> None:
    machine_id = await started(gpu_host, sleeping_platform)
    tenant_used(gpu_host.kernel, FIRST)
    with gpu_host.hardware.edit(FIRST) as gpu:
        gpu.memory_clear_stuck = True

    await stopped(gpu_host, sleeping_platform, machine_id)

    assert gpu_host.state(FIRST) == GpuState.QUARANTINED
    assert not gpu_host.clean(FIRST)
    [quarantined] = [e for e in gpu_host.events(FIRST) if e.action == "quarantined"]
    assert quarantined.detail["code"] == "memory_clear_timeout"
    assert quarantined.detail["timed_out"] is True


@pytest.fixture
def a10_host(tmp_path: Path, test_image: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[GpuHost]:
    """An A10 with its HD-audio function in one IOMMU group, on a kernel without
    ``reset_subordinate``: no bus reset can clear it."""
    builder = build_a10_with_audio(tmp_path / "sys")
    with fixture_host(tmp_path, builder, test_image, monkeypatch) as host:
        yield host


async def test_a_gpu_no_bus_reset_can_scrub_is_offered_only_with_a_trusted_scrubber(
    a10_host: GpuHost, sleeping_platform: Platform
) -> None:
    refused = await started(a10_host, sleeping_platform, kind="a10")
    assert a10_host.machine(refused).state == MachineState.FAILED
    record = a10_host.stores.gpus.get_gpu(A10_GPU)
    assert record is not None and not record.available
    assert "cannot be scrubbed between tenants" in record.reason
    assert "no trusted scrubber is configured" in record.reason

    a10_host.scrubber = scrubber_command(a10_host.tmp)
    machine_id = await started(a10_host, sleeping_platform, kind="a10")
    assert a10_host.machine(machine_id).state == MachineState.STARTED
    assert a10_host.driver_of(A10_AUDIO) == "vfio-pci", "the companion goes with its GPU"
    vfio = [d for d in values_of(a10_host.argv(machine_id), "-device") if "vfio-pci" in d]
    assert vfio == [
        f"vfio-pci,host={A10_GPU},id=gpu0,bus=rp0,addr=00.0,multifunction=on",
        f"vfio-pci,host={A10_AUDIO},id=gpu0-f1,bus=rp0,addr=00.1",
    ]
    tenant_used(a10_host.kernel, A10_GPU)

    await stopped(a10_host, sleeping_platform, machine_id)

    assert a10_host.state(A10_GPU) == GpuState.FREE
    assert a10_host.clean(A10_GPU)
    [scrubbed] = [e for e in a10_host.events(A10_GPU) if e.action == "scrubbed"]
    assert scrubbed.detail == {
        "run_id": scrubbed.detail["run_id"],
        "method": "trusted-scrubber",
        "via": "memset",
    }
    assert a10_host.hardware.gpu(A10_GPU).resets == [], "no FLR stood in for the scrub"
    assert (a10_host.driver_of(A10_GPU), a10_host.driver_of(A10_AUDIO)) == (
        "nvidia",
        "snd_hda_intel",
    )


async def test_settings_a_tenant_staged_or_changed_are_put_back(
    gpu_host: GpuHost, sleeping_platform: Platform
) -> None:
    machine_id = await started(gpu_host, sleeping_platform)
    with gpu_host.hardware.edit(FIRST) as gpu:  # what the tenant did from inside its VM
        gpu.ecc = ["disabled", "disabled"]  # took effect at a reset of its own
        gpu.mig = ["disabled", "enabled"]
        gpu.cc = ["off", "devtools"]

    await stopped(gpu_host, sleeping_platform, machine_id)

    state = gpu_host.hardware.gpu(FIRST)
    assert (state.ecc, state.mig, state.cc) == (["enabled"] * 2, ["disabled"] * 2, ["off"] * 2)
    assert state.resets == ["sbr", "sbr"], "one more scrub applied the restored ECC mode"
    assert gpu_host.state(FIRST) == GpuState.FREE
    assert "settings_reapplied" in gpu_host.actions(FIRST)


async def test_a_setting_that_does_not_come_back_quarantines(
    gpu_host: GpuHost, sleeping_platform: Platform
) -> None:
    class StuckTools(AdminToolsSettings):
        def stage(self, bdf: str, name: SettingName, value: str) -> None:
            pass  # firmware that ignores the request

    gpu_host.settings_sources = [
        NvmlSettings(InlineRunner(), module=FAKE_NVML),
        StuckTools(FAKE_TOOLS),
    ]
    machine_id = await started(gpu_host, sleeping_platform)
    with gpu_host.hardware.edit(FIRST) as gpu:
        gpu.ppcie = ["off", "on"]

    await stopped(gpu_host, sleeping_platform, machine_id)

    assert gpu_host.state(FIRST) == GpuState.QUARANTINED
    assert "ppcie: current on, pending on, default off" in gpu_host.quarantine_reason(FIRST)


def _fatal_aer(host: GpuHost, machine_id: str) -> None:
    host.builder.set_aer(FIRST, "aer_dev_fatal", CmpltTO=1)


def _narrow_link(host: GpuHost, machine_id: str) -> None:
    host.builder.set_link(host.builder.device_dir(FIRST), (GEN5, 8), (GEN5, 16))


def _failed_row_remap(host: GpuHost, machine_id: str) -> None:
    with host.hardware.edit(FIRST) as gpu:
        gpu.remapped_rows = [0, 1, 0, 1]


def _ecc_error(host: GpuHost, machine_id: str) -> None:
    with host.hardware.edit(FIRST) as gpu:
        gpu.uncorrectable_ecc = 2


def _xid(code: int) -> Callable[[GpuHost, str], None]:
    def forward(host: GpuHost, machine_id: str) -> None:
        # The guest sees the GPU at 0000:81:00.0 (behind its root port): the host maps it.
        line = f"NVRM: Xid (PCI:0000:81:00): {code}, pid=1234, name=python"
        host.guest_writes(machine_id, {"type": "xid", "line": line})

    return forward


@pytest.mark.parametrize(
    ("defect", "finding"),
    [
        (_fatal_aer, "aer-fatal: 1 uncorrectable (fatal) PCIe error(s) since the claim"),
        (_narrow_link, "link-width: x8, capable of x16"),
        (_failed_row_remap, "row-remap: row remapping failed"),
        (_ecc_error, "ecc: 2 uncorrectable ECC error(s)"),
        (_xid(79), "xid-79"),
        (_xid(13), None),  # a graphics engine exception: the tenant's bug, not the GPU's
    ],
    ids=["aer", "link", "row-remap", "ecc", "xid-79", "xid-13"],
)
async def test_health_beyond_the_ids_decides_who_gets_the_gpu_next(
    gpu_host: GpuHost,
    sleeping_platform: Platform,
    defect: Callable[[GpuHost, str], None],
    finding: str | None,
) -> None:
    machine_id = await started(gpu_host, sleeping_platform)
    defect(gpu_host, machine_id)

    await stopped(gpu_host, sleeping_platform, machine_id)

    if finding is None:
        assert gpu_host.state(FIRST) == GpuState.FREE
    else:
        assert gpu_host.state(FIRST) == GpuState.QUARANTINED
        assert finding in gpu_host.quarantine_reason(FIRST)
    xids = [e for e in gpu_host.events(FIRST) if e.action == "xid"]
    for xid in xids:
        assert xid.detail["guest_address"] == "0000:81:00.0"
        assert xid.iommu_group == HGX_GROUPS[FIRST]


@pytest.fixture
def twin_host(
    tmp_path: Path, test_image: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[GpuHost]:
    """Two L40S behind one switch without ACS: one IOMMU group (a 6.14 kernel, whose port
    offers ``reset_subordinate``)."""
    builder = build_two_gpus_one_group(tmp_path / "sys", reset_subordinate=True)
    with fixture_host(tmp_path, builder, test_image, monkeypatch) as host:
        yield host


async def test_two_gpus_in_one_iommu_group_go_to_one_tenant_together(
    twin_host: GpuHost, sleeping_platform: Platform
) -> None:
    half = await started(twin_host, sleeping_platform, gpus=1, kind="l40s")
    assert twin_host.machine(half).state == MachineState.FAILED
    assert "insufficient resources" in twin_host.machine(half).failure_reason

    machine_id = await started(twin_host, sleeping_platform, gpus=2, kind="l40s")
    assert twin_host.held(machine_id) == TWIN_GPUS
    assert all(twin_host.driver_of(bdf) == "vfio-pci" for bdf in TWIN_GPUS)
    vfio = [d for d in values_of(twin_host.argv(machine_id), "-device") if "vfio-pci" in d]
    assert [d.split(",")[1] for d in vfio] == [f"host={bdf}" for bdf in TWIN_GPUS]
    other = await started(twin_host, sleeping_platform, gpus=1, kind="l40s")
    assert twin_host.machine(other).state == MachineState.FAILED
    tenant_used(twin_host.kernel, *TWIN_GPUS)
    twin_host.kernel.writes.clear()

    await stopped(twin_host, sleeping_platform, machine_id)

    assert {twin_host.state(bdf) for bdf in TWIN_GPUS} == {GpuState.FREE}
    assert twin_host.clean(*TWIN_GPUS)
    resets = [w for w in twin_host.kernel.writes if w[0].endswith(RESETS)]
    assert resets == [("bus/pci/devices/0000:41:00.0/reset_subordinate", "1")]
    [handoff] = twin_host.handoff_runs(TWIN_GPUS[0])
    assert handoff.progress.devices["iommu_group"] == TWIN_GROUP
    assert twin_host.handoff_runs(TWIN_GPUS[1]) == [], "one handoff for the group"
    for bdf in TWIN_GPUS:
        events = twin_host.events(bdf)
        assert {e.iommu_group for e in events} == {TWIN_GROUP}
        assert [e.action for e in events][-1] == "free"


class VfioReleasedAfterARetry(SystemClock):
    """The agent's clock: its first sleep after the handoff's first retry is when the last
    process with the VFIO group open lets go."""

    def __init__(self, host: GpuHost) -> None:
        self.host = host

    async def sleep(self, seconds: float) -> None:
        retried = any(run.progress.retries for run in self.host.handoff_runs(FIRST) if run.progress)
        if retried and (self.host.builder.proc / "777").exists():
            self.host.builder.remove_holder(777)
        await super().sleep(seconds)


@pytest.mark.parametrize("let_go", [True, False], ids=["closed", "held-open"])
async def test_the_handoff_waits_for_the_vfio_group_to_close(
    gpu_host: GpuHost, sleeping_platform: Platform, let_go: bool
) -> None:
    machine_id = await started(gpu_host, sleeping_platform)
    gpu_host.builder.add_holder(777, "qemu-system-x86", f"/dev/vfio/{HGX_GROUPS[FIRST]}")
    gpu_host.kernel.writes.clear()

    clock = VfioReleasedAfterARetry(gpu_host) if let_go else None
    agent = gpu_host.agent(sleeping_platform(), clock=clock)
    await agent.start()
    agent.submit_operation(machine_id, StopRequest(timeout_s=0.0))
    await settle(agent)
    await agent.close()

    [handoff] = gpu_host.handoff_runs(FIRST)
    assert handoff.progress.retries[0].step == "check_vm_released"
    assert "IOMMU group 13 is still open" in handoff.progress.retries[0].error
    if let_go:
        assert gpu_host.state(FIRST) == GpuState.FREE
        return
    assert gpu_host.state(FIRST) == GpuState.QUARANTINED
    assert gpu_host.kernel.writes == [], "nothing touched while QEMU may still use it"


async def test_guest_memory_off_1g_pages_is_a_machine_event(
    gpu_host: GpuHost, sleeping_platform: Platform
) -> None:
    write_host_memory(gpu_host.builder.root, free_1g={0: 0, 1: 0}, free_2m={0: 8192, 1: 8192})

    machine_id = await started(gpu_host, sleeping_platform)

    assert gpu_host.machine(machine_id).state == MachineState.STARTED
    events = gpu_host.stores.machines.list_events(machine_id)
    [event] = [e for e in events if e.type == "gpu_memory"]
    assert event.status == "fallback"
    assert "no 1G pages: node 0 has 0 usable 1G pages" in event.reason
    backends = [v for v in values_of(gpu_host.argv(machine_id), "-object") if "ram-node0" in v]
    assert "hugetlbsize=2M" in backends[0]
