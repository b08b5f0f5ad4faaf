"""GPU machines on fixture hosts: claims, VFIO binding, the QEMU command line, release on every
exit path, the handoff (reset, verify, host drivers back) and quarantine, with crashes injected.

The sysfs trees copy real layouts (tests/devices/sysfs_fixture.py) and a kernel simulator
applies the writes the PCI core acts on. The agent, store, engine and devices layer are real.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hangar.agent.agent import Agent
from hangar.agent.gpus import HostGpus
from hangar.agent.guest import QemuGuestPlatform
from hangar.agent.host import HostServices
from hangar.agent.placement import HostPlacement
from hangar.agent.platform import GuestPlatform
from hangar.agent.steps import new_run
from hangar.clock import SystemClock
from hangar.devices import NoNvml, SysfsRoot
from hangar.errors import InsufficientCapacity
from hangar.images.initramfs import module_bytes, resolve_modules
from hangar.images.kernel import ensure_kernel
from hangar.model.config import MachineConfig
from hangar.model.gpu import GpuState
from hangar.model.host import HostInfo
from hangar.model.machine import Machine, MachineState, new_machine_id, new_ulid
from hangar.model.run import CreateRequest, DestroyRequest, StopRequest
from hangar.store.embedded import EmbeddedStores, open_embedded_stores
from hangar.vmm.qemu import QemuDriver
from tests.agent.vmm_stand_in import ARGV_FILE, SleepingVmmPlatform
from tests.conftest import SUITE_CACHE
from tests.devices.kernel_sim import KernelSimulator
from tests.devices.sysfs_fixture import (
    HGX_H100_GPUS,
    SysfsBuilder,
    build_gpu_sharing_group_with_nic,
    build_hgx_h100,
)
from tests.fixtures.driver_bundle import write_bundle

HOST = "gpu-host-1"
HOST_INFO = HostInfo(id=HOST, region="local", cpus=64, memory_mb=512 * 1024)


class SimulatedCrash(Exception):
    """Raised by the crash hook: the agent stops there as a killed process would."""


@dataclass
class GpuHost:
    tmp: Path
    builder: SysfsBuilder
    kernel: KernelSimulator
    stores: EmbeddedStores
    image: str

    def gpus(self) -> HostGpus:
        return HostGpus(HOST, SysfsRoot(self.builder.root, writer=self.kernel), NoNvml("tests"))

    @property
    def placement(self) -> HostPlacement:
        return HostPlacement(self.stores.claims, HOST_INFO)

    def agent(self, platform: GuestPlatform, crash_after: str = "") -> Agent:
        def hook(operation: str, step: str) -> None:
            if crash_after == f"{operation}:{step}":
                raise SimulatedCrash(crash_after)

        host = HostServices(
            platform=platform,
            machines_dir=self.tmp / "machines",
            placement=self.placement,
            gpu_store=self.stores.gpus,
            gpus=self.gpus(),
        )
        return Agent(self.stores.machines, self.stores.runs, host, SystemClock(), hook)

    def state(self, bdf: str) -> GpuState:
        gpu = self.placement.gpu(bdf)
        assert gpu is not None, bdf
        return gpu.state

    def states(self) -> list[GpuState]:
        return [gpu.state for gpu in self.placement.gpus()]

    def held(self, machine_id: str) -> list[str]:
        return self.placement.claimed_bdfs(machine_id)

    def machine(self, machine_id: str) -> Machine:
        machine = self.stores.machines.get_machine(machine_id)
        assert machine is not None
        return machine

    def driver_of(self, bdf: str) -> str | None:
        link = self.builder.root / "bus/pci/devices" / bdf / "driver"
        return link.resolve().name if link.is_symlink() else None

    def add_machine(self, gpus: int, kind: str = "h100-sxm") -> str:
        now = SystemClock().now()
        machine_id = new_machine_id()
        config = MachineConfig.model_validate(
            {
                "image": self.image,
                "init": {"cmd": ["sleep", "600"]},
                "guest": {"cpu_kind": "performance", "gpu_kind": kind, "gpus": gpus},
            }
        )
        self.stores.machines.insert_machine(
            Machine(
                id=machine_id,
                name=machine_id,
                app="gpu",
                state=MachineState.CREATED,
                region="local",
                instance_id=new_ulid(now),
                version=1,
                config=config,
                created_at=now,
                updated_at=now,
                host_id=HOST,
            )
        )
        return machine_id


@pytest.fixture
def gpu_host(tmp_path: Path, test_image: str) -> Iterator[GpuHost]:
    builder = build_hgx_h100(tmp_path / "sys")
    host = GpuHost(
        tmp_path,
        builder,
        KernelSimulator(builder),
        open_embedded_stores(tmp_path / "db"),
        test_image,
    )
    yield host
    for handle in host.stores.runs.list_vm_handles().values():
        asyncio.run(SleepingVmmPlatform(SUITE_CACHE, QemuDriver()).kill(handle))


@pytest.fixture(scope="module")
def driver_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A driver bundle for the real guest kernel (its "driver" is the kernel's dummy module)."""
    guest_kernel = ensure_kernel(SUITE_CACHE)
    [module] = resolve_modules(guest_kernel.modules_dir, ["dummy"])
    bundle = write_bundle(
        tmp_path_factory.mktemp("bundle") / "driver",
        {"dummy": module_bytes(guest_kernel.modules_dir / module)},
        kernel_version=guest_kernel.version,
    )
    return bundle


@pytest.fixture
def sleeping_platform(driver_bundle: Path) -> Callable[[], SleepingVmmPlatform]:
    return lambda: SleepingVmmPlatform(SUITE_CACHE, QemuDriver(), driver_bundle=driver_bundle)


async def settle(agent: Agent) -> None:
    """Until no run is unfinished: woken by the agent's own change notices (bounded)."""
    for _ in range(600):
        if not agent.runs.list_runs(unfinished_only=True):
            return
        await agent.wait_for_change(0.1)
    raise AssertionError(f"runs never finished: {agent.runs.list_runs(unfinished_only=True)}")


async def test_gpu_machine_claims_close_gpus_binds_them_and_passes_each_bdf(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform]
) -> None:
    agent = gpu_host.agent(sleeping_platform())
    await agent.start()
    machine_id = gpu_host.add_machine(gpus=2)
    agent.submit_operation(machine_id, CreateRequest())
    await settle(agent)
    assert gpu_host.machine(machine_id).state == MachineState.STARTED
    claimed = gpu_host.held(machine_id)
    assert len(claimed) == 2
    assert all(gpu_host.state(bdf) == GpuState.CLAIMED for bdf in claimed)
    assert len({HGX_H100_GPUS[bdf] for bdf in claimed}) == 1, "one NUMA node"
    domains = {
        record.nvlink_domain for bdf in claimed if (record := gpu_host.stores.gpus.get_gpu(bdf))
    }
    assert len(domains) == 1, "one NVLink domain"
    for bdf in claimed:
        assert gpu_host.driver_of(bdf) == "vfio-pci"
    argv = json.loads((gpu_host.tmp / "machines" / machine_id / ARGV_FILE).read_text())
    for bdf in claimed:
        assert f"vfio-pci,host={bdf}" in argv
    drives = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]
    assert len(drives) == 2 and "readonly=on" in drives[1], "the driver bundle, read-only"
    initrd = (gpu_host.tmp / "machines" / machine_id / "initrd.img").read_bytes()
    assert b"HANGAR_DRIVER_BUNDLE=1" in initrd

    agent.submit_operation(machine_id, StopRequest(timeout_s=0.0))
    await settle(agent)
    await agent.close()
    assert gpu_host.placement.claim_of(machine_id) is None
    for bdf in claimed:
        assert gpu_host.state(bdf) == GpuState.FREE
        assert gpu_host.driver_of(bdf) == "nvidia", "back on its host driver"
        assert (f"bus/pci/devices/{bdf}/reset", "1") in gpu_host.kernel.writes
    actions = [event.action for event in gpu_host.stores.gpus.list_gpu_events(claimed[0])]
    assert actions[::-1] == ["claimed", "cleaning", "reset", "host_drivers_restored", "free"]


async def test_a_launch_that_fails_releases_its_gpus(
    gpu_host: GpuHost, driver_bundle: Path
) -> None:
    # Real QEMU: it refuses the VFIO device this host does not really have.
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
    assert "vfio" in machine.failure_reason.lower()
    assert gpu_host.held(machine_id) == []
    assert gpu_host.placement.claim_of(machine_id) is None
    assert all(state == GpuState.FREE for state in gpu_host.states())
    assert all(gpu_host.driver_of(bdf) == "nvidia" for bdf in HGX_H100_GPUS)


async def test_failed_reset_quarantines_until_an_operator_releases_it(
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
    quarantined = gpu_host.stores.gpus.get_gpu(bdf)
    assert quarantined is not None and "reset" in quarantined.quarantine_reason

    # Quarantined GPUs are never offered: eight are asked for, seven are clean.
    eight = gpu_host.add_machine(gpus=8)
    agent.submit_operation(eight, CreateRequest())
    await settle(agent)
    failed = gpu_host.machine(eight)
    assert failed.state == MachineState.FAILED
    assert "insufficient resources" in failed.failure_reason
    assert all(state != GpuState.CLAIMED for state in gpu_host.states())

    gpu_host.kernel.reset_faults.clear()
    builder_config = gpu_host.builder.root / "bus/pci/devices" / bdf / "config"
    builder_config.write_bytes(b"\xde\x10\x30\x23" + builder_config.read_bytes()[4:])
    agent.release_quarantine(bdf, actor="alice", reason="reseated the board")
    await settle(agent)
    await agent.close()
    assert gpu_host.state(bdf) == GpuState.FREE
    [event] = [
        e for e in gpu_host.stores.gpus.list_gpu_events(bdf) if e.action == "quarantine_released"
    ]
    assert event.actor == "alice" and event.detail["reason"] == "reseated the board"


def test_a_gpu_sharing_its_group_with_a_nic_is_never_claimed(tmp_path: Path) -> None:
    builder = build_gpu_sharing_group_with_nic(tmp_path / "sys")
    stores = open_embedded_stores(tmp_path / "db")
    host = HostGpus(HOST, SysfsRoot(builder.root, writer=KernelSimulator(builder)), NoNvml("t"))
    [record] = host.register(stores.gpus)
    assert not record.available
    assert "Ethernet controller" in record.reason
    placement = HostPlacement(stores.claims, HOST_INFO)
    placement.register(stores.gpus.list_gpus())
    guest = MachineConfig.model_validate(
        {"image": "x", "guest": {"cpu_kind": "performance", "gpu_kind": record.kind}}
    ).guest
    with pytest.raises(InsufficientCapacity):
        placement.place("m1", guest)


HANDOFF_STEPS = ["reset_gpu", "restore_host_drivers", "return_gpu"]


@pytest.mark.parametrize("step", HANDOFF_STEPS)
async def test_crash_during_handoff_never_frees_a_dirty_gpu(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform], step: str
) -> None:
    agent = gpu_host.agent(sleeping_platform(), crash_after=f"handoff:{step}")
    await agent.start()
    machine_id = gpu_host.add_machine(gpus=1)
    agent.submit_operation(machine_id, CreateRequest())
    await settle(agent)
    [bdf] = gpu_host.held(machine_id)
    agent.submit_operation(machine_id, StopRequest(timeout_s=0.0))
    for _ in range(400):
        await agent.wait_for_change(0.1)
        runs = gpu_host.stores.runs.list_runs(f"gpu:{bdf}")
        if runs and step in runs[-1].steps_done:
            break
    await agent.close()
    if step != "return_gpu":
        assert gpu_host.state(bdf) == GpuState.CLEANING, "not free before the handoff ends"

    restarted = gpu_host.agent(sleeping_platform())
    await restarted.start()
    await settle(restarted)
    await restarted.close()
    assert gpu_host.state(bdf) == GpuState.FREE
    assert gpu_host.driver_of(bdf) == "nvidia"


@pytest.mark.parametrize("step", ["place_machine", "bind_gpus", "launch_vm"])
async def test_crash_during_gpu_start_resumes_without_double_claims(
    gpu_host: GpuHost, sleeping_platform: Callable[[], SleepingVmmPlatform], step: str
) -> None:
    agent = gpu_host.agent(sleeping_platform(), crash_after=f"create:{step}")
    await agent.start()
    machine_id = gpu_host.add_machine(gpus=2)
    agent.submit_operation(machine_id, CreateRequest())
    for _ in range(400):
        await agent.wait_for_change(0.1)
        [run] = gpu_host.stores.runs.list_runs(machine_id)
        if step in run.steps_done:
            break
    await agent.close()
    restarted = gpu_host.agent(sleeping_platform())
    await restarted.start()
    await settle(restarted)
    assert gpu_host.machine(machine_id).state == MachineState.STARTED
    assert len(gpu_host.held(machine_id)) == 2
    assert gpu_host.states().count(GpuState.CLAIMED) == 2
    restarted.submit(new_run(machine_id, DestroyRequest(force=True), 0.0))
    await settle(restarted)
    await restarted.close()
    assert all(state == GpuState.FREE for state in gpu_host.states())
