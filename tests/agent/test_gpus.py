"""GPU machines on fixture hosts: claims of whole IOMMU groups (and Fabric Manager
partitions) through the scheduler, VFIO binding, NVLink, the QEMU layout, release on every
exit path, the group handoff (scrub, settings, health, host drivers back) and quarantine,
with crashes injected at every step of start and handoff.

The sysfs trees copy real layouts (tests/devices/sysfs_fixture.py) and a kernel simulator
applies the writes the PCI core acts on. The agent, store, engine, scheduler and devices
layer are real (tests/agent/gpu_fixture.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hangar.agent.agent import Agent
from hangar.agent.gpus import HostGpus
from hangar.agent.guest import QemuGuestPlatform
from hangar.agent.steps import new_run
from hangar.devices.hostpaths import HostPaths
from hangar.devices.worker import RunnerWriter
from hangar.errors import InsufficientCapacity
from hangar.images.driver_bundle import NVLINK_OFF_KERNEL_ARG
from hangar.model.config import MachineConfig
from hangar.model.gpu import GpuState
from hangar.model.machine import MachineState
from hangar.model.run import CreateRequest, DestroyRequest, HandoffRequest, StopRequest
from hangar.settings import Settings
from hangar.store.embedded import open_embedded_stores
from hangar.vmm.qemu import QemuDriver
from tests.agent.gpu_fixture import (
    HGX_GROUPS,
    HOST,
    HOST_INFO,
    GpuHost,
    partition_active,
    settle,
    started,
    until,
)
from tests.agent.helpers import step_names
from tests.agent.vmm_stand_in import SleepingVmmPlatform
from tests.conftest import SUITE_CACHE
from tests.devices.kernel_sim import KernelSimulator, tenant_used
from tests.devices.sysfs_fixture import (
    HGX_H100_GPUS,
    build_gpu_sharing_group_with_nic,
    build_hgx_h100,
)
from tests.devices.test_fabric import MODULES
from tests.vmm.test_gpu_topology import values_of


async def test_two_gpus_get_a_fabric_partition_vfio_and_the_q35_layout_then_a_scrub(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform]
) -> None:
    agent = gpu_host.agent(sleeping_platform())
    await agent.start()
    machine_id = gpu_host.add_machine(gpus=2)
    agent.submit_operation(machine_id, CreateRequest())
    await settle(agent)

    assert gpu_host.machine(machine_id).state == MachineState.STARTED
    claimed = gpu_host.held(machine_id)
    # Fabric Manager's two-GPU partition 3 is modules 1 and 2: chosen by module id, not by
    # PCI address order (which would pair 18:00.0 with 2a:00.0, modules 1 and 3).
    assert claimed == [MODULES[1], MODULES[2]] == ["0000:18:00.0", "0000:3a:00.0"]
    assert all(gpu_host.state(bdf) == GpuState.CLAIMED for bdf in claimed)
    assert partition_active(gpu_host, 3)
    assert all(gpu_host.driver_of(bdf) == "vfio-pci" for bdf in claimed)
    argv = gpu_host.argv(machine_id)
    assert values_of(argv, "-machine") == ["q35"] and values_of(argv, "-accel") == ["kvm"]
    devices = values_of(argv, "-device")
    assert "pxb-pcie,id=pxb0,bus_nr=128,numa_node=0,bus=pcie.0" in devices
    assert [d for d in devices if d.startswith("vfio-pci")] == [
        f"vfio-pci,host={bdf},id=gpu{i},bus=rp{i},addr=00.0" for i, bdf in enumerate(claimed)
    ]
    assert any("hugetlbsize=1G" in value for value in values_of(argv, "-object"))
    assert NVLINK_OFF_KERNEL_ARG not in values_of(argv, "-append")[0]
    drives = values_of(argv, "-drive")
    assert len(drives) == 2 and "readonly=on" in drives[1], "the driver bundle, read-only"
    initrd = (gpu_host.tmp / "machines" / machine_id / "initrd.img").read_bytes()
    assert b"HANGAR_DRIVER_BUNDLE=1" in initrd
    tenant_used(gpu_host.kernel, *claimed)

    agent.submit_operation(machine_id, StopRequest(timeout_s=0.0))
    await settle(agent)
    await agent.close()

    assert gpu_host.placement.claim_of(machine_id) is None
    assert not partition_active(gpu_host, 3), "deactivated at the handoff"
    for bdf in claimed:
        assert gpu_host.state(bdf) == GpuState.FREE
        assert gpu_host.driver_of(bdf) == "nvidia", "back on its host driver"
        assert gpu_host.hardware.gpu(bdf).resets == ["sbr"], "a bus reset; no FLR counted"
        assert gpu_host.clean(bdf)
        assert (f"bus/pci/devices/{bdf}/reset_method", "bus") in gpu_host.kernel.writes
        record = gpu_host.stores.gpus.get_gpu(bdf)
        assert record is not None and record.claim is None
    events = gpu_host.events(claimed[0])
    assert [event.action for event in events] == [
        "claimed",
        "bound",
        "fabric_activated",
        "cleaning",
        "fabric_deactivated",
        "scrubbed",
        "host_drivers_restored",
        "free",
    ]
    assert {event.iommu_group for event in events} == {HGX_GROUPS[claimed[0]]}
    assert events[5].detail["method"] == "secondary-bus-reset"
    [handoff] = gpu_host.handoff_runs(claimed[0])
    assert handoff.status == "succeeded"
    assert [handoff.request] == [HandoffRequest(bdf=claimed[0])]


async def test_one_nvswitch_gpu_boots_with_nvlink_off_and_no_partition(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform]
) -> None:
    machine_id = await started(gpu_host, sleeping_platform)

    assert gpu_host.machine(machine_id).state == MachineState.STARTED
    assert NVLINK_OFF_KERNEL_ARG in values_of(gpu_host.argv(machine_id), "-append")[0].split()
    assert "fabric_activated" not in gpu_host.actions(gpu_host.held(machine_id)[0])


async def test_two_machines_of_two_gpus_fill_one_four_gpu_partition_first(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform]
) -> None:
    first = await started(gpu_host, sleeping_platform, gpus=2)
    second = await started(gpu_host, sleeping_platform, gpus=2)

    assert gpu_host.held(first) == [MODULES[1], MODULES[2]]
    assert sorted(gpu_host.held(second)) == sorted([MODULES[3], MODULES[4]])
    assert partition_active(gpu_host, 3) and partition_active(gpu_host, 4)


async def test_without_fabric_manager_several_nvswitch_gpus_are_never_claimed(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform]
) -> None:
    gpu_host.fmpm = None
    agent = gpu_host.agent(sleeping_platform())
    await agent.start()
    pair, lone = gpu_host.add_machine(gpus=2), gpu_host.add_machine(gpus=1)
    agent.submit_operation(pair, CreateRequest())
    agent.submit_operation(lone, CreateRequest())
    await settle(agent)
    await agent.close()

    assert gpu_host.machine(pair).state == MachineState.FAILED
    assert "insufficient resources" in gpu_host.machine(pair).failure_reason
    assert gpu_host.machine(lone).state == MachineState.STARTED


async def test_a_launch_refused_under_tcg_frees_its_group(
    gpu_host: GpuHost, driver_bundle: Path
) -> None:
    # The real platform on this TCG host: GPU machines need KVM, and the spec says so.
    agent = gpu_host.agent(
        QemuGuestPlatform(SUITE_CACHE, QemuDriver(), driver_bundle=driver_bundle)
    )
    await agent.start()
    machine_id = gpu_host.add_machine(gpus=1)
    agent.submit_operation(machine_id, CreateRequest())
    await settle(agent)
    await agent.close()

    machine = gpu_host.machine(machine_id)
    assert machine.state == MachineState.LAUNCH_FAILED
    assert "GPU machines need KVM" in machine.failure_reason
    assert gpu_host.placement.claim_of(machine_id) is None
    assert all(state == GpuState.FREE for state in gpu_host.states())
    assert all(gpu_host.driver_of(bdf) == "nvidia" for bdf in HGX_H100_GPUS)


async def test_a_failed_scrub_quarantines_until_an_operator_releases_it(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform]
) -> None:
    agent = gpu_host.agent(sleeping_platform())
    await agent.start()
    machine_id = gpu_host.add_machine(gpus=1)
    agent.submit_operation(machine_id, CreateRequest())
    await settle(agent)
    [bdf] = gpu_host.held(machine_id)
    gpu_host.kernel.reset_faults[bdf] = "unresponsive"
    agent.submit_operation(machine_id, DestroyRequest(force=True))
    await settle(agent)

    assert gpu_host.state(bdf) == GpuState.QUARANTINED
    assert "config-space: reads ffff:ffff" in gpu_host.quarantine_reason(bdf)
    [quarantined] = [e for e in gpu_host.events(bdf) if e.action == "quarantined"]
    assert quarantined.detail["code"] == "unhealthy"
    assert quarantined.iommu_group == HGX_GROUPS[bdf]

    # Quarantined GPUs are never offered: eight are asked for, seven are clean.
    eight = gpu_host.add_machine(gpus=8)
    agent.submit_operation(eight, CreateRequest())
    await settle(agent)
    assert gpu_host.machine(eight).state == MachineState.FAILED
    assert "insufficient resources" in gpu_host.machine(eight).failure_reason
    assert all(state != GpuState.CLAIMED for state in gpu_host.states())

    gpu_host.kernel.reset_faults.clear()
    config = gpu_host.builder.root / "bus/pci/devices" / bdf / "config"
    config.write_bytes(b"\xde\x10\x30\x23" + config.read_bytes()[4:])
    agent.release_quarantine(bdf, actor="alice", reason="reseated the board")
    await settle(agent)
    await agent.close()

    assert gpu_host.state(bdf) == GpuState.FREE
    assert gpu_host.driver_of(bdf) == "nvidia"
    assert gpu_host.quarantine_reason(bdf) == ""
    [released] = [e for e in gpu_host.events(bdf) if e.action == "quarantine_released"]
    assert released.actor == "alice" and released.detail["reason"] == "reseated the board"
    assert released.iommu_group == HGX_GROUPS[bdf]
    assert gpu_host.actions(bdf)[-3:] == ["scrubbed", "host_drivers_restored", "free"]


def test_a_gpu_sharing_its_group_with_a_nic_is_never_claimed(tmp_path: Path) -> None:
    builder = build_gpu_sharing_group_with_nic(tmp_path / "sys")
    stores = open_embedded_stores(tmp_path / "db")
    host = GpuHost(tmp_path, builder, KernelSimulator(builder), stores, "x")
    [record] = host.gpus().register(stores.gpus)
    assert not record.available
    assert "Ethernet controller" in record.reason
    placement = host.placement
    placement.register(stores.gpus.list_gpus())
    guest = MachineConfig.model_validate(
        {"image": "x", "guest": {"cpu_kind": "performance", "gpu_kind": record.kind}}
    ).guest
    with pytest.raises(InsufficientCapacity):
        placement.place("m1", guest)
    assert HOST_INFO.id == HOST


START_STEPS = [
    "place_machine",
    "claim_gpu_groups",
    "bind_gpus",
    "prepare_nvlink",
    "launch_vm",
    "map_gpu_addresses",
]
HANDOFF_STEPS = step_names(HandoffRequest(bdf="0000:18:00.0"))


def test_the_gpu_steps_are_in_the_start_and_handoff_plans() -> None:
    start = step_names(CreateRequest())
    assert [name for name in start if name in START_STEPS] == START_STEPS
    assert HANDOFF_STEPS == [
        "check_vm_released",
        "deactivate_fabric",
        "hold_group",
        "restage_settings",
        "scrub_group",
        "check_group_health",
        "restore_host_drivers",
        "apply_staged_settings",
        "verify_group",
        "return_group",
    ]
    stop = step_names(StopRequest())
    assert stop.index("collect_gpu_xids") < stop.index("release_claim")


async def crash_then_restart(
    host: GpuHost,
    platform: Callable[[], SleepingVmmPlatform],
    target: str,
    reached: Callable[[], bool],
    act: Callable[[Agent], object],
    after_crash: Callable[[], None] = lambda: None,
) -> None:
    """Run ``act`` on an agent armed to crash at ``target``; once ``reached`` holds (the
    step is recorded done), drop that agent as a killed process would, check
    ``after_crash``, and start another over the same stores and devices."""
    agent = host.agent(platform(), crash_after=target)
    await agent.start()
    act(agent)
    await until(agent, reached)
    await agent.close()
    after_crash()
    restarted = host.agent(platform())
    await restarted.start()
    await settle(restarted)
    await restarted.close()


@pytest.mark.parametrize("step", START_STEPS)
async def test_crash_during_gpu_start_resumes_without_double_claims(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform], step: str
) -> None:
    machine_id = gpu_host.add_machine(gpus=2)

    def reached() -> bool:
        runs = gpu_host.stores.runs.list_runs(machine_id)
        return bool(runs) and step in runs[0].steps_done

    await crash_then_restart(
        gpu_host,
        sleeping_platform,
        f"create:{step}",
        reached,
        lambda agent: agent.submit_operation(machine_id, CreateRequest()),
    )

    assert gpu_host.machine(machine_id).state == MachineState.STARTED
    claimed = gpu_host.held(machine_id)
    assert claimed == [MODULES[1], MODULES[2]]
    assert gpu_host.states().count(GpuState.CLAIMED) == 2
    assert [p for p in (3, 4, 5, 6, 1, 2, 0) if partition_active(gpu_host, p)] == [3]
    assert all(gpu_host.driver_of(bdf) == "vfio-pci" for bdf in claimed)
    agent = gpu_host.agent(sleeping_platform())
    await agent.start()
    agent.submit(new_run(machine_id, DestroyRequest(force=True), 0.0))
    await settle(agent)
    await agent.close()
    assert all(state == GpuState.FREE for state in gpu_host.states())
    assert not partition_active(gpu_host, 3)


@pytest.mark.parametrize("step", [*HANDOFF_STEPS, "rollback:quarantine_group"])
async def test_crash_during_handoff_never_frees_a_dirty_gpu(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform], step: str
) -> None:
    machine_id = await started(gpu_host, sleeping_platform, gpus=2)
    claimed = gpu_host.held(machine_id)
    lead = claimed[0]
    tenant_used(gpu_host.kernel, *claimed)
    with gpu_host.hardware.edit(lead) as gpu:  # the tenant turned ECC off: a restore cycle
        gpu.ecc = ["disabled", "disabled"]
    failing = step == "rollback:quarantine_group"
    if failing:
        gpu_host.builder.set_aer(lead, "aer_dev_fatal", CmpltTO=1)

    def reached() -> bool:
        runs = gpu_host.handoff_runs(lead)
        if not runs:
            return False
        done = runs[-1].rollback_done if failing else runs[-1].steps_done
        return step.removeprefix("rollback:") in done

    def dirty_is_never_free() -> None:
        for bdf in claimed:
            if not gpu_host.clean(bdf):
                assert gpu_host.state(bdf) != GpuState.FREE
        if step != "return_group":
            assert gpu_host.state(lead) != GpuState.FREE, "not free before its handoff ends"

    await crash_then_restart(
        gpu_host,
        sleeping_platform,
        f"handoff:{step}",
        reached,
        lambda agent: agent.submit_operation(machine_id, StopRequest(timeout_s=0.0)),
        dirty_is_never_free,
    )

    states = {gpu_host.state(bdf) for bdf in claimed}
    assert not partition_active(gpu_host, 3)
    if failing:
        # Each GPU of an HGX board is an IOMMU group of its own, handed off on its own.
        assert [gpu_host.state(bdf) for bdf in claimed] == [GpuState.QUARANTINED, GpuState.FREE]
        assert "aer-fatal" in gpu_host.quarantine_reason(lead)
        return
    assert states == {GpuState.FREE}
    assert gpu_host.clean(*claimed)
    assert all(gpu_host.driver_of(bdf) == "nvidia" for bdf in claimed)
    assert gpu_host.hardware.gpu(lead).ecc == ["enabled", "enabled"]
    assert "sbr" in gpu_host.hardware.gpu(lead).resets
    assert "flr" not in gpu_host.hardware.gpu(lead).resets


async def test_crash_after_the_xids_are_collected_keeps_them_for_the_handoff(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform]
) -> None:
    machine_id = await started(gpu_host, sleeping_platform)
    [bdf] = gpu_host.held(machine_id)
    gpu_host.guest_writes(
        machine_id,
        {"type": "xid", "line": "NVRM: Xid (PCI:0000:81:00): 79, GPU has fallen off the bus."},
    )

    def reached() -> bool:
        runs = gpu_host.stores.runs.list_runs(machine_id)
        return "collect_gpu_xids" in runs[-1].steps_done

    await crash_then_restart(
        gpu_host,
        sleeping_platform,
        "stop:collect_gpu_xids",
        reached,
        lambda agent: agent.submit_operation(machine_id, StopRequest(timeout_s=0.0)),
    )

    assert gpu_host.state(bdf) == GpuState.QUARANTINED
    assert "xid-79" in gpu_host.quarantine_reason(bdf)
    [xid] = [event for event in gpu_host.events(bdf) if event.action == "xid"]
    assert (xid.detail["code"], xid.iommu_group) == (79, HGX_GROUPS[bdf])
    assert xid.detail["guest_address"] == "0000:81:00.0"


def test_an_agent_from_settings_makes_every_device_write_in_a_killable_worker(
    tmp_path: Path,
) -> None:
    builder = build_hgx_h100(tmp_path / "sys")
    devices = HostGpus.from_settings(Settings(sysfs_root=builder.root, host_id="h", nvml=False))

    assert isinstance(devices.sysfs.writer, RunnerWriter)
    assert devices.context.sysfs is devices.sysfs
    assert devices.paths == HostPaths.beside(builder.root)
    assert devices.fabric is None and devices.trusted_scrubber is None
