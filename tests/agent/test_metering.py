"""The usage meter on its own, on an injected clock: real SQLite stores, real processes
standing in for the VMMs (``sleep``; the meter only asks whether a VMM process runs), and
the agent's crash simulated by dropping the meter and building a new one over the same
database, as a restarted agent does.

Totals are exact: the clock moves only when the test moves it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from hangar.agent.host import HostServices
from hangar.agent.metering import NoVolumeRecords, UsageMeter, VolumeUsage, boot_id
from hangar.agent.placement import HostPlacement
from hangar.agent.platform import GuestPlatform
from hangar.agent.steps import LaunchVm, ReleaseVm, new_run
from hangar.clock import ManualClock
from hangar.model.config import MachineConfig
from hangar.model.gpu import GpuRecord
from hangar.model.host import HostInfo
from hangar.model.machine import Machine, MachineState
from hangar.model.run import StartRequest
from hangar.model.usage import UsageSubject
from hangar.store.embedded import EmbeddedStores, open_embedded_stores
from hangar.vmm.proc import read_process

HOST = HostInfo(id="host-a", region="ord", cpus=32, memory_mb=128 * 1024)
T0 = 1_700_000_000.0


class ProcessPlatform:
    """The one question the meter asks of a platform: is this handle's process running."""

    def running(self, handle: dict[str, Any]) -> bool:
        info = read_process(int(handle["pid"]))
        return info is not None and not info.exited and info.start_time == handle["start_time"]


@dataclass
class Volumes:
    present: list[VolumeUsage] = field(default_factory=list)

    def volumes(self) -> list[VolumeUsage]:
        return list(self.present)


@dataclass
class Host:
    tmp: Path
    stores: EmbeddedStores
    clock: ManualClock
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    volumes: Volumes = field(default_factory=Volumes)

    def services(self) -> HostServices:
        return HostServices(
            platform=cast(GuestPlatform, ProcessPlatform()),
            machines_dir=self.tmp / "machines",
            placement=HostPlacement(self.stores.claims, HOST),
            gpu_store=self.stores.gpus,
        )

    def meter(self) -> UsageMeter:
        """A meter as a (re)started agent builds it, over the same database."""
        return UsageMeter(
            self.stores.usage,
            self.stores.machines,
            self.stores.runs,
            self.services(),
            self.clock,
            checkpoint_s=10.0,
            volumes=self.volumes,
        )

    def add_machine(
        self, machine_id: str, app: str = "web", guest: dict[str, Any] | None = None
    ) -> None:
        if self.stores.machines.get_app(app) is None:
            self.stores.machines.create_app(app, "acme", T0)
        config = MachineConfig.model_validate({"image": "oci:/x:y", "guest": guest or {"cpus": 2}})
        self.stores.machines.insert_machine(
            Machine(
                id=machine_id,
                name=machine_id,
                app=app,
                state=MachineState.STARTED,
                region="ord",
                instance_id="i1",
                version=1,
                config=config,
                created_at=T0,
                updated_at=T0,
            )
        )

    def launch(self, machine_id: str) -> dict[str, Any]:
        """A VMM process for the machine, recorded as the agent's LaunchVm records it."""
        process = subprocess.Popen(["sleep", "600"], start_new_session=True)
        self.processes.append(process)
        info = read_process(process.pid)
        assert info is not None
        handle = {"pid": process.pid, "start_time": info.start_time}
        self.stores.runs.put_vm_handle(machine_id, handle)
        return handle

    def kill(self, handle: dict[str, Any]) -> None:
        os.kill(int(handle["pid"]), signal.SIGKILL)
        for process in self.processes:
            if process.pid == handle["pid"]:
                process.wait()

    def seconds(self, machine_id: str) -> float:
        return sum(
            i.seconds_within(0.0, 1e12)
            for i in self.stores.usage.intervals(None, 0.0, 1e12)
            if i.machine_id == machine_id
        )


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    built = Host(tmp_path, open_embedded_stores(tmp_path / "hangar.db"), ManualClock(T0))
    built.services().placement.register([])
    try:
        yield built
    finally:
        for process in built.processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()


def launched(meter: UsageMeter, machine_id: str) -> None:
    """What the engine tells the meter once launch_vm is recorded."""
    meter.step_finished(new_run(machine_id, StartRequest(), T0), LaunchVm.name, True, 1.0, None)


def released(meter: UsageMeter, machine_id: str) -> None:
    meter.step_finished(new_run(machine_id, StartRequest(), T0), ReleaseVm.name, True, 0.1, None)


def test_a_boot_is_metered_from_launch_to_release(host: Host) -> None:
    host.add_machine("m1", guest={"cpus": 2, "memory_mb": 1024})
    meter = host.meter()
    handle = host.launch("m1")
    launched(meter, "m1")
    launched(meter, "m1")
    host.clock.advance(25.0)
    meter.tick()
    host.clock.advance(5.0)
    meter.tick()
    host.clock.advance(12.0)
    meter.tick()
    interval = host.stores.usage.get_interval(boot_id("m1", handle))
    assert interval is not None
    assert (interval.started_at, interval.until) == (T0, T0 + 42.0)
    assert (interval.org, interval.app, interval.host, interval.region) == (
        "acme",
        "web",
        "host-a",
        "ord",
    )
    assert (interval.cpus, interval.memory_mb, interval.gpus) == (2, 1024, 0.0)
    host.clock.advance(3.0)
    host.kill(handle)
    host.stores.runs.delete_vm_handle("m1")
    released(meter, "m1")
    released(meter, "m1")
    assert host.seconds("m1") == 45.0
    assert host.stores.usage.open_intervals(HOST.id) == []


def test_a_crash_while_the_guest_died_bills_only_up_to_the_last_checkpoint(host: Host) -> None:
    host.add_machine("m1")
    meter = host.meter()
    handle = host.launch("m1")
    launched(meter, "m1")
    host.clock.advance(10.0)
    meter.checkpoint()
    host.clock.advance(7.0)
    # The agent dies here; the guest dies while it is down; the agent comes back later.
    host.kill(handle)
    host.clock.advance(300.0)
    restarted = host.meter()
    restarted.recover()
    assert host.seconds("m1") == 10.0
    # The resumed exit run releases the VM: already closed, nothing more is counted.
    restarted.checkpoint()
    host.stores.runs.delete_vm_handle("m1")
    released(restarted, "m1")
    restarted.checkpoint()
    assert host.seconds("m1") == 10.0
    assert len(host.stores.usage.intervals(None, 0.0, 1e12)) == 1


def test_a_guest_that_ran_through_the_crash_is_billed_once_for_all_of_it(host: Host) -> None:
    host.add_machine("m1")
    meter = host.meter()
    handle = host.launch("m1")
    launched(meter, "m1")
    host.clock.advance(10.0)
    meter.checkpoint()
    host.clock.advance(30.0)
    restarted = host.meter()
    restarted.recover()
    restarted.recover()
    restarted.tick()
    assert host.seconds("m1") == 40.0
    host.clock.advance(10.0)
    restarted.tick()
    restarted.tick()
    host.kill(handle)
    host.stores.runs.delete_vm_handle("m1")
    released(restarted, "m1")
    assert host.seconds("m1") == 50.0
    # Everything again, as a second crash and restart would: the totals do not move.
    again = host.meter()
    again.recover()
    again.checkpoint()
    released(again, "m1")
    assert host.seconds("m1") == 50.0
    assert len(host.stores.usage.intervals(None, 0.0, 1e12)) == 1


def test_a_crash_between_launch_and_open_loses_only_that_gap(host: Host) -> None:
    host.add_machine("m1")
    host.launch("m1")
    host.clock.advance(4.0)
    meter = host.meter()
    meter.recover()
    meter.checkpoint()
    host.clock.advance(6.0)
    meter.checkpoint()
    assert host.seconds("m1") == 6.0


def test_a_release_the_meter_missed_closes_at_the_last_checkpoint(host: Host) -> None:
    host.add_machine("m1")
    meter = host.meter()
    handle = host.launch("m1")
    launched(meter, "m1")
    host.clock.advance(10.0)
    meter.checkpoint()
    host.clock.advance(5.0)
    host.kill(handle)
    host.stores.runs.delete_vm_handle("m1")
    meter.checkpoint()
    assert host.seconds("m1") == 10.0
    assert host.stores.usage.open_intervals(HOST.id) == []


def test_each_boot_is_its_own_interval(host: Host) -> None:
    host.add_machine("m1")
    meter = host.meter()
    first = host.launch("m1")
    launched(meter, "m1")
    host.clock.advance(5.0)
    host.kill(first)
    host.stores.runs.delete_vm_handle("m1")
    released(meter, "m1")
    host.clock.advance(100.0)
    host.launch("m1")
    launched(meter, "m1")
    host.clock.advance(7.0)
    meter.checkpoint()
    assert host.seconds("m1") == 12.0
    assert len(host.stores.usage.intervals(None, 0.0, 1e12)) == 2


def test_a_gpu_claim_is_metered_with_its_kind_and_count(host: Host) -> None:
    gpus = [
        GpuRecord(host_id=HOST.id, bdf=f"0000:{bus:02x}:00.0", kind="h100-sxm", numa_node=0)
        for bus in (0x18, 0x2A)
    ]
    services = host.services()
    services.placement.register(gpus)
    guest = {"cpu_kind": "performance", "cpus": 8, "gpu_kind": "h100-sxm", "gpus": 2}
    host.add_machine("g1", app="infer", guest=guest)
    machine = host.stores.machines.get_machine("g1")
    assert machine is not None
    services.placement.place("g1", machine.config.guest)
    meter = host.meter()
    host.launch("g1")
    launched(meter, "g1")
    (interval,) = host.stores.usage.open_intervals(HOST.id)
    assert (interval.gpu_kind, interval.gpus, interval.cpu_kind) == ("h100-sxm", 2.0, "performance")


def test_volumes_are_metered_through_their_seam(host: Host) -> None:
    assert list(NoVolumeRecords().volumes()) == []
    meter = host.meter()
    meter.checkpoint()
    assert host.stores.usage.intervals(None, 0.0, 1e12) == []
    host.volumes.present = [VolumeUsage(id="vol_1", org="acme", app="db", size_gb=10.0)]
    meter.checkpoint()
    host.clock.advance(60.0)
    meter.checkpoint()
    host.volumes.present = [VolumeUsage(id="vol_1", org="acme", app="db", size_gb=20.0)]
    host.clock.advance(30.0)
    meter.checkpoint()
    host.clock.advance(30.0)
    host.volumes.present = []
    meter.checkpoint()
    host.clock.advance(30.0)
    meter.checkpoint()
    intervals = host.stores.usage.intervals("acme", 0.0, 1e12)
    assert [(i.volume_gb, i.seconds_within(0.0, 1e12), i.closed) for i in intervals] == [
        (10.0, 60.0, True),
        (20.0, 0.0, True),
    ]
    assert all(i.subject is UsageSubject.VOLUME for i in intervals)
