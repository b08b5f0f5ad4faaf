"""GPU hosts for agent tests: a fixture sysfs tree with the kernel simulator behind it, the
simulated GPUs' memory and modes, NVML and gpu-admin-tools stand-ins over that state, a
Fabric Manager stand-in, the host's NUMA memory and CPU, and real stores.

The agent, engine, store, scheduler and devices layer are the real ones; only the kernel,
the vendor tools and the VMM process are stood in for (``tests/devices``,
``tests/agent/vmm_stand_in.py``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hangar.agent.agent import Agent
from hangar.agent.engine import RetryPolicy
from hangar.agent.gpus import HostGpus
from hangar.agent.host import HostServices
from hangar.agent.placement import HostPlacement
from hangar.agent.platform import GuestPlatform
from hangar.clock import Clock, SystemClock
from hangar.devices.fabric import FabricManager
from hangar.devices.handoff import HandoffContext
from hangar.devices.hostpaths import HostPaths
from hangar.devices.nvml import PynvmlReader
from hangar.devices.scrub import CommandScrubber, TrustedScrubber
from hangar.devices.settings import AdminToolsSettings, NvmlSettings, SettingsSource
from hangar.devices.sysfs import SysfsRoot, SysfsWriter
from hangar.devices.worker import DeviceDeadlines, InlineRunner, RunnerWriter, WorkerRunner
from hangar.model.config import MachineConfig
from hangar.model.gpu import GpuEvent, GpuState
from hangar.model.host import HostInfo
from hangar.model.machine import Machine, MachineState, new_machine_id, new_ulid
from hangar.model.run import CreateRequest, RunRecord, StopRequest
from hangar.store.embedded import EmbeddedStores, open_embedded_stores
from hangar.vmm.accel import kvm_choice
from hangar.vmm.qemu import QemuDriver
from tests.agent.vmm_stand_in import ARGV_FILE, SleepingVmmPlatform
from tests.conftest import REPO_ROOT, SUITE_CACHE
from tests.devices.gpu_hw import CLEAR, SYSFS_ENV, FakeNvmlHost, Hardware
from tests.devices.kernel_sim import KernelSimulator
from tests.devices.sysfs_fixture import HGX_H100_GPUS, SysfsBuilder
from tests.devices.test_fabric import MODULES
from tests.devices.test_scrub import StepClock
from tests.devices.test_settings import FAKE_NVML, FAKE_TOOLS
from tests.vmm.gpu_host import SAPPHIRE_RAPIDS_CPUINFO, write_host_memory

HOST = "gpu-host-1"
HOST_INFO = HostInfo(id=HOST, region="local", cpus=64, memory_mb=512 * 1024)
FAST_RETRIES = RetryPolicy(attempts=4, first_delay_s=0.01, max_delay_s=0.05)
GUEST_MEMORY_MB = 1024


class SimulatedCrash(Exception):
    """Raised by the crash hook: the agent stops there as a killed process would."""


@dataclass
class GpuHost:
    tmp: Path
    builder: SysfsBuilder
    kernel: KernelSimulator
    stores: EmbeddedStores
    image: str
    fmpm: list[str] | None = None
    scrubber: TrustedScrubber | None = None
    writer: SysfsWriter | None = None
    """How sysfs writes are made (default: the simulator, in this process)."""
    deadlines: DeviceDeadlines = field(default_factory=DeviceDeadlines)
    settings_sources: list[SettingsSource] | None = None
    nvml_host: Callable[[Path], FakeNvmlHost] = FakeNvmlHost
    """NVML over the fixture host (a subclass adds what a test needs, such as MIG)."""

    @property
    def hardware(self) -> Hardware:
        assert self.kernel.hardware is not None
        return self.kernel.hardware

    @property
    def sysfs(self) -> SysfsRoot:
        return SysfsRoot(self.builder.root, writer=self.writer or self.kernel)

    def killable(self, deadlines: DeviceDeadlines) -> None:
        """Every write in a device worker killed at its deadline, as the agent runs them."""
        self.kernel.save()
        worker = WorkerRunner(python_path=[REPO_ROOT], kill_grace_s=2.0)
        self.deadlines = deadlines
        self.writer = RunnerWriter(worker, deadlines, "tests.devices.kernel_sim:write_in_worker")

    def gpus(self) -> HostGpus:
        sysfs = self.sysfs
        sources = self.settings_sources
        if sources is None:
            sources = [
                NvmlSettings(InlineRunner(), module=FAKE_NVML),
                AdminToolsSettings(FAKE_TOOLS),
            ]
        context = HandoffContext(
            sysfs=sysfs,
            paths=HostPaths.beside(sysfs),
            deadlines=self.deadlines,
            settings_sources=sources,
            trusted_scrubber=self.scrubber,
            nvml_runner=InlineRunner(),
            nvml_module=FAKE_NVML,
            clock=StepClock(),
        )
        root = self.builder.root
        nvml_host = self.nvml_host
        return HostGpus(
            HOST,
            sysfs,
            PynvmlReader(load=lambda: nvml_host(root)),
            context,
            FabricManager(self.fmpm) if self.fmpm is not None else None,
        )

    @property
    def placement(self) -> HostPlacement:
        return HostPlacement(self.stores.claims, HOST_INFO)

    def agent(
        self, platform: GuestPlatform, crash_after: str = "", clock: Clock | None = None
    ) -> Agent:
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
        return Agent(
            self.stores.machines,
            self.stores.runs,
            host,
            clock or SystemClock(),
            hook,
            FAST_RETRIES,
        )

    # what the tests look at
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

    def events(self, bdf: str) -> list[GpuEvent]:
        """The GPU's events, oldest first."""
        return self.stores.gpus.list_gpu_events(bdf)[::-1]

    def actions(self, bdf: str) -> list[str]:
        return [event.action for event in self.events(bdf)]

    def handoff_runs(self, bdf: str) -> list[RunRecord]:
        return self.stores.runs.list_runs(f"gpu:{bdf}")

    def writes(self) -> list[tuple[str, str]]:
        return self.kernel.logged_writes()

    def quarantine_reason(self, bdf: str) -> str:
        record = self.stores.gpus.get_gpu(bdf)
        assert record is not None
        return record.quarantine_reason

    def argv(self, machine_id: str) -> list[str]:
        return list(json.loads((self.tmp / "machines" / machine_id / ARGV_FILE).read_text()))

    def guest_writes(self, machine_id: str, *events: dict[str, object]) -> None:
        """What the guest writes to its control channel while it runs."""
        control = self.tmp / "machines" / machine_id / "ctl.jsonl"
        with control.open("a") as log:
            for event in events:
                log.write(json.dumps(event) + "\n")

    def clean(self, *bdfs: str) -> bool:
        return all(self.hardware.gpu(bdf).vram == CLEAR for bdf in bdfs)

    def add_machine(
        self, gpus: int, kind: str = "h100-sxm", memory_mb: int = GUEST_MEMORY_MB
    ) -> str:
        now = SystemClock().now()
        machine_id = new_machine_id()
        config = MachineConfig.model_validate(
            {
                "image": self.image,
                "init": {"cmd": ["sleep", "600"]},
                "restart": {"policy": "no"},
                "guest": {
                    "cpu_kind": "performance",
                    "gpu_kind": kind,
                    "gpus": gpus,
                    "memory_mb": memory_mb,
                },
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


@contextmanager
def fixture_host(
    tmp: Path,
    builder: SysfsBuilder,
    image: str,
    monkeypatch: pytest.MonkeyPatch,
    fmpm: list[str] | None = None,
) -> Iterator[GpuHost]:
    """A GPU host over ``builder``'s tree with fresh stores; the stand-in VMMs it leaves
    are killed at the end."""
    monkeypatch.setenv(SYSFS_ENV, str(builder.root))
    prepare_host(builder)
    stores = open_embedded_stores(tmp / "db")
    try:
        yield GpuHost(tmp, builder, KernelSimulator(builder), stores, image, fmpm)
    finally:
        kill_stand_ins(stores)


def prepare_host(builder: SysfsBuilder, free_1g: int = 64) -> None:
    """What a GPU host has besides its PCI tree: NUMA nodes with huge pages, its CPU, and
    for an HGX board each GPU's module id as NVML reports it."""
    write_host_memory(builder.root, free_1g={0: free_1g, 1: free_1g}, free_2m={0: 8192, 1: 8192})
    assert builder.host is not None
    (builder.host / "proc/cpuinfo").write_text(SAPPHIRE_RAPIDS_CPUINFO)
    hardware = Hardware(builder.host)
    for module, bdf in MODULES.items():
        if (builder.root / "bus/pci/devices" / bdf).exists():
            with hardware.edit(bdf) as gpu:
                gpu.module_id = module


def scrubber_command(folder: Path) -> CommandScrubber:
    """A trusted scrubber that writes all of a simulated GPU's memory and reads it back."""
    script = folder / "scrubber.py"
    script.write_text(
        "import fcntl, json, os, sys\n"
        "bdf = sys.argv[1]\n"
        "host = os.path.dirname(os.environ['HANGAR_TEST_SYSFS'])\n"
        "state = os.path.join(host, 'gpu-hw.json')\n"
        "with open(os.path.join(host, 'gpu-hw.lock'), 'a') as lock:\n"
        "    fcntl.flock(lock, fcntl.LOCK_EX)\n"
        "    data = json.load(open(state)) if os.path.exists(state) else {}\n"
        "    data.setdefault(bdf, {})['vram'] = 'clear'\n"
        "    with open(state + '.scrub', 'w') as out:\n"
        "        json.dump(data, out)\n"
        "    os.replace(state + '.scrub', state)\n"
        "print(json.dumps({'bytes_total': 24 << 30, 'bytes_written': 24 << 30,\n"
        "                  'samples_checked': 4096, 'mismatches': 0}))\n"
    )
    return CommandScrubber([sys.executable, str(script), "{bdf}"], name="memset")


Platform = Callable[[], SleepingVmmPlatform]


async def started(host: GpuHost, platform: Platform, gpus: int = 1, kind: str = "h100-sxm") -> str:
    """A machine of ``gpus`` GPUs created by an agent that then stops, as a process would."""
    agent = host.agent(platform())
    await agent.start()
    machine_id = host.add_machine(gpus=gpus, kind=kind)
    agent.submit_operation(machine_id, CreateRequest())
    await settle(agent)
    await agent.close()
    return machine_id


async def stopped(host: GpuHost, platform: Platform, machine_id: str) -> None:
    """The machine stopped by a fresh agent, which waits for every handoff."""
    agent = host.agent(platform())
    await agent.start()
    agent.submit_operation(machine_id, StopRequest(timeout_s=0.0))
    await settle(agent)
    await agent.close()


async def settle(agent: Agent) -> None:
    """Until no run is unfinished: woken by the agent's own change notices (bounded)."""
    for _ in range(600):
        if not agent.runs.list_runs(unfinished_only=True):
            return
        await agent.wait_for_change(0.1)
    raise AssertionError(f"runs never finished: {agent.runs.list_runs(unfinished_only=True)}")


async def until(agent: Agent, condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds, woken by the agent's change notices (bounded)."""
    for _ in range(600):
        if condition():
            return
        await agent.wait_for_change(0.1)
    raise AssertionError("the condition never held")


def kill_stand_ins(stores: EmbeddedStores) -> None:
    for handle in stores.runs.list_vm_handles().values():
        asyncio.run(SleepingVmmPlatform(SUITE_CACHE, QemuDriver()).kill(handle))


HGX_GROUPS = {bdf: 13 + 4 * position for position, bdf in enumerate(HGX_H100_GPUS)}
"""The fixture's IOMMU group of each HGX GPU (one each, below its own switch port)."""
KVM_HOST = kvm_choice("the KVM host these fixtures stand for")


def partition_active(host: GpuHost, partition: int) -> bool:
    assert host.fmpm is not None
    return any(
        p.active for p in FabricManager(host.fmpm).partitions() if p.partition_id == partition
    )
