"""Volumes in the agent, on real images (``qemu-img``), real SQLite stores and the real agent,
engine and steps; a machine's VMM is a stand-in process (``tests/agent/vmm_stand_in.py``)
whose QEMU command line is still built by the real driver:

- every step of every volume operation (create blank, encrypted, from a snapshot, a fork;
  extend; snapshot; delete a snapshot; delete) is crashed after, and a new agent over the
  same stores and files finishes it: nothing partial, nothing left over;
- a machine's boot attaches its mounts (crashed after ``attach_volumes``,
  ``prepare_initrd`` and ``launch_vm``: resumed, the volume disks on its command line, the
  key file gone), and stop and destroy detach them (crashed after ``detach_volumes``);
- daily snapshots and retention follow the injected clock, moved by days;
- at start, the agent makes a volume the API recorded but never submitted, lets go of an
  attachment no live machine holds, and removes files no record names once they are old.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hangar.agent.agent import Agent
from hangar.agent.engine import RetryPolicy
from hangar.agent.host import HostServices
from hangar.agent.operations import build_plan
from hangar.agent.placement import HostPlacement
from hangar.agent.volumes import HostVolumes
from hangar.clock import Clock, ManualClock, SystemClock
from hangar.images.volume_tools import ensure_volume_tools
from hangar.model.config import MachineConfig
from hangar.model.host import HostInfo
from hangar.model.machine import Machine, MachineState, new_machine_id, new_ulid
from hangar.model.run import (
    CreateRequest,
    DestroyRequest,
    RunRequest,
    RunStatus,
    StopRequest,
    VolumeCreateRequest,
    VolumeDeleteRequest,
    VolumeDeleteSnapshotRequest,
    VolumeExtendRequest,
    VolumeSnapshotRequest,
    volume_subject,
)
from hangar.model.volume import Volume, VolumeState
from hangar.store.embedded import EmbeddedStores, open_embedded_stores
from hangar.store.volume_claims import attach_volume
from hangar.vmm.qemu import QemuDriver
from hangar.volumes import VolumeHost, VolumeSettings, new_snapshot_id, new_volume_id
from hangar.volumes.model import GIB
from hangar.volumes.schedule import DAY_S
from tests.agent.gpu_fixture import SimulatedCrash, kill_stand_ins, settle, until
from tests.agent.vmm_stand_in import ARGV_FILE, SleepingVmmPlatform
from tests.conftest import SUITE_CACHE

HOST = HostInfo(id="volume-host", region="local", cpus=8, memory_mb=16384)
FAST_RETRIES = RetryPolicy(attempts=2, first_delay_s=0.01, max_delay_s=0.01)
GRACE_S = 3600.0


@dataclass
class VolumeHostFixture:
    tmp: Path
    stores: EmbeddedStores
    image: str
    clock: Clock

    @property
    def library(self) -> VolumeHost:
        settings = VolumeSettings(
            root=self.tmp / "volumes", reserve_bytes=0, orphan_grace_s=GRACE_S
        )
        return VolumeHost(settings, clock=self.clock)

    def services(self) -> HostServices:
        return HostServices(
            platform=SleepingVmmPlatform(SUITE_CACHE, QemuDriver()),
            machines_dir=self.tmp / "machines",
            placement=HostPlacement(self.stores.claims, HOST),
            gpu_store=self.stores.gpus,
            volumes=HostVolumes(self.library, self.stores.volumes, HOST.id),
        )

    def agent(self, crash_after: str = "") -> Agent:
        def hook(operation: str, step: str) -> None:
            if crash_after == f"{operation}:{step}":
                raise SimulatedCrash(crash_after)

        return Agent(
            self.stores.machines, self.stores.runs, self.services(), self.clock, hook, FAST_RETRIES
        )

    def record(self, **fields: object) -> Volume:
        now = self.clock.now()
        volume = Volume.model_validate(
            {
                "id": new_volume_id(),
                "name": "data",
                "app": "vols",
                "region": HOST.region,
                "host_id": HOST.id,
                "size_gb": 1,
                "encrypted": False,
                "state": VolumeState.CREATING,
                "snapshot_retention": 5,
                "created_at": now,
                "updated_at": now,
                **fields,
            }
        )
        self.stores.volumes.insert_volume(volume)
        return volume

    def volume(self, volume_id: str) -> Volume:
        found = self.stores.volumes.get_volume(volume_id)
        assert found is not None
        return found

    def add_machine(self, mounts: list[tuple[str, str]]) -> str:
        now = self.clock.now()
        machine_id = new_machine_id()
        config = MachineConfig.model_validate(
            {
                "image": self.image,
                "init": {"cmd": ["sleep", "600"]},
                "restart": {"policy": "no"},
                "mounts": [{"volume": volume_id, "path": path} for volume_id, path in mounts],
            }
        )
        self.stores.machines.insert_machine(
            Machine(
                id=machine_id,
                name=machine_id,
                app="vols",
                state=MachineState.CREATED,
                region=HOST.region,
                instance_id=new_ulid(now),
                version=1,
                config=config,
                created_at=now,
                updated_at=now,
                host_id=HOST.id,
            )
        )
        return machine_id

    def machine(self, machine_id: str) -> Machine:
        found = self.stores.machines.get_machine(machine_id)
        assert found is not None
        return found


@pytest.fixture
def host(tmp_path: Path, test_image: str) -> Iterator[VolumeHostFixture]:
    stores = open_embedded_stores(tmp_path / "db")
    try:
        yield VolumeHostFixture(tmp_path, stores, test_image, SystemClock())
    finally:
        kill_stand_ins(stores)
        stores.close()


Before = Callable[[], object]


def nothing() -> None:
    """Nothing to do before the run is submitted."""


async def run_to_end(
    host: VolumeHostFixture, subject: str, request: RunRequest, before: Before = nothing
) -> None:
    """``before`` runs once the agent has started (a volume's record, inserted as the API
    does: an agent that starts and finds it would make the volume itself)."""
    agent = host.agent()
    await agent.start()
    before()
    agent.submit_operation(subject, request)
    await settle(agent)
    await agent.close()
    [last] = host.stores.runs.list_runs(subject)[-1:]
    assert last.status is RunStatus.SUCCEEDED, last


async def made(host: VolumeHostFixture, encrypted: bool = False, **fields: object) -> Volume:
    volume_id = new_volume_id()
    await run_to_end(
        host,
        volume_subject(volume_id),
        VolumeCreateRequest(size_gb=1, encrypted=encrypted),
        lambda: host.record(id=volume_id, encrypted=encrypted, **fields),
    )
    return host.volume(volume_id)


async def crash_then_finish(
    host: VolumeHostFixture, subject: str, request: RunRequest, step: str, before: Before = nothing
) -> None:
    """Run ``request`` on an agent that dies right after ``step``; then let a new agent over
    the same stores and files finish it."""
    agent = host.agent(crash_after=f"{request.operation}:{step}")
    await agent.start()
    before()
    agent.submit_operation(subject, request)

    def reached() -> bool:
        runs = host.stores.runs.list_runs(subject)
        return bool(runs) and step in runs[-1].steps_done

    await until(agent, reached)
    await agent.close()
    restarted = host.agent()
    await restarted.start()
    await settle(restarted)
    await restarted.close()
    [last] = host.stores.runs.list_runs(subject)[-1:]
    assert last.status is RunStatus.SUCCEEDED, last


def step_names(host: VolumeHostFixture, request: RunRequest) -> list[str]:
    plan = build_plan(request, volume_subject(new_volume_id()), host.services())
    return [step.name for step in plan.steps]


def no_leftovers(library: VolumeHost) -> None:
    folders = (library.layout.images_dir, library.layout.keys_dir, library.layout.run_dir)
    for folder in folders:
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".partial")]
    assert list(library.layout.run_dir.iterdir()) == [], "no passphrase file outlives a step"


def test_each_volume_operation_is_the_librarys_steps_with_its_records(
    host: VolumeHostFixture,
) -> None:
    source = new_volume_id()
    assert step_names(host, VolumeCreateRequest(size_gb=1, encrypted=True)) == [
        "create_key",
        "create_image",
        "mark_volume_created",
    ]
    fork = VolumeCreateRequest(size_gb=1, encrypted=False, source_volume_id=source)
    assert step_names(host, fork) == [
        "freeze_source",
        "copy_image",
        "release_source",
        "mark_volume_created",
    ]
    assert step_names(host, VolumeExtendRequest(size_gb=2)) == [
        "resize_image",
        "grow_filesystem",
        "record_volume_size",
    ]
    snapshot = VolumeSnapshotRequest(snapshot_id=new_snapshot_id())
    assert step_names(host, snapshot) == ["take_snapshot", "record_snapshot"]
    assert step_names(host, VolumeDeleteRequest()) == [
        "mark_volume_destroying",
        "check_not_in_use",
        "delete_key",
        "delete_image",
        "mark_volume_destroyed",
    ]


CREATES = {
    "blank": VolumeCreateRequest(size_gb=1, encrypted=False),
    "encrypted": VolumeCreateRequest(size_gb=1, encrypted=True),
}


@pytest.mark.parametrize(
    ("kind", "step"),
    [
        (kind, step)
        for kind in ("blank", "encrypted")
        for step in ("create_key", "create_image", "mark_volume_created")
        if kind == "encrypted" or step != "create_key"
    ],
)
async def test_a_create_crashed_after_any_step_is_finished(
    host: VolumeHostFixture, kind: str, step: str
) -> None:
    request = CREATES[kind]
    volume_id = new_volume_id()
    await crash_then_finish(
        host,
        volume_subject(volume_id),
        request,
        step,
        lambda: host.record(id=volume_id, encrypted=request.encrypted),
    )
    library = host.library
    assert host.volume(volume_id).state is VolumeState.CREATED
    info = library.info(volume_id)
    assert info.virtual_size == GIB and info.encrypted == request.encrypted
    assert library.keys.exists(volume_id) == request.encrypted
    no_leftovers(library)


@pytest.mark.parametrize("step", ["copy_image", "mark_volume_created"])
async def test_a_restore_crashed_after_any_step_is_finished(
    host: VolumeHostFixture, step: str
) -> None:
    source = await made(host)
    snapshot_id = new_snapshot_id()
    await run_to_end(
        host, volume_subject(source.id), VolumeSnapshotRequest(snapshot_id=snapshot_id)
    )
    request = VolumeCreateRequest(
        size_gb=1, encrypted=False, source_volume_id=source.id, snapshot_id=snapshot_id
    )
    volume_id = new_volume_id()
    await crash_then_finish(
        host,
        volume_subject(volume_id),
        request,
        step,
        lambda: host.record(
            id=volume_id,
            encrypted=False,
            state=VolumeState.RESTORING,
            source_volume_id=source.id,
            snapshot_id=snapshot_id,
        ),
    )
    assert host.volume(volume_id).state is VolumeState.CREATED
    assert host.library.info(volume_id).virtual_size == GIB
    no_leftovers(host.library)


@pytest.mark.parametrize("step", ["freeze_source", "copy_image", "release_source"])
async def test_a_fork_crashed_after_any_step_is_finished_and_releases_its_source(
    host: VolumeHostFixture, step: str
) -> None:
    source = await made(host)
    request = VolumeCreateRequest(size_gb=1, encrypted=False, source_volume_id=source.id)
    volume_id = new_volume_id()
    await crash_then_finish(
        host,
        volume_subject(volume_id),
        request,
        step,
        lambda: host.record(id=volume_id, state=VolumeState.HYDRATING, source_volume_id=source.id),
    )
    assert host.volume(volume_id).state is VolumeState.CREATED
    assert host.library.info(source.id).snapshots == [], "the fork's snapshot is released"
    assert host.library.exists(volume_id)


@pytest.mark.parametrize("step", ["resize_image", "record_volume_size"])
async def test_an_extend_crashed_after_any_step_is_finished(
    host: VolumeHostFixture, step: str
) -> None:
    volume = await made(host)
    await crash_then_finish(host, volume_subject(volume.id), VolumeExtendRequest(size_gb=3), step)
    assert host.volume(volume.id).size_gb == 3
    assert host.library.info(volume.id).virtual_size == 3 * GIB


@pytest.mark.parametrize("step", ["take_snapshot", "record_snapshot"])
async def test_a_snapshot_crashed_after_any_step_is_recorded_once(
    host: VolumeHostFixture, step: str
) -> None:
    volume = await made(host)
    snapshot_id = new_snapshot_id()
    request = VolumeSnapshotRequest(snapshot_id=snapshot_id)
    await crash_then_finish(host, volume_subject(volume.id), request, step)
    assert [s.id for s in host.volume(volume.id).snapshots] == [snapshot_id]
    assert [s.id for s in host.library.snapshots(volume.id)] == [snapshot_id]


@pytest.mark.parametrize("step", ["delete_snapshot", "forget_snapshot"])
async def test_a_snapshot_delete_crashed_after_any_step_is_finished(
    host: VolumeHostFixture, step: str
) -> None:
    volume = await made(host)
    snapshot_id = new_snapshot_id()
    await run_to_end(
        host, volume_subject(volume.id), VolumeSnapshotRequest(snapshot_id=snapshot_id)
    )
    request = VolumeDeleteSnapshotRequest(snapshot_id=snapshot_id)
    await crash_then_finish(host, volume_subject(volume.id), request, step)
    assert host.volume(volume.id).snapshots == []
    assert host.library.snapshots(volume.id) == []


@pytest.mark.parametrize(
    "step",
    [
        "mark_volume_destroying",
        "check_not_in_use",
        "delete_key",
        "delete_image",
        "mark_volume_destroyed",
    ],
)
async def test_a_delete_crashed_after_any_step_is_finished(
    host: VolumeHostFixture, step: str
) -> None:
    # LUKS is slow to set up: the encrypted case where it matters, the plain one elsewhere.
    volume = await made(host, encrypted=step in ("check_not_in_use", "delete_key"))
    await crash_then_finish(host, volume_subject(volume.id), VolumeDeleteRequest(), step)
    assert host.volume(volume.id).state is VolumeState.DESTROYED
    assert not host.library.exists(volume.id) and not host.library.keys.exists(volume.id)
    no_leftovers(host.library)


async def test_a_delete_of_an_attached_volume_is_refused_and_changes_nothing(
    host: VolumeHostFixture,
) -> None:
    volume = await made(host)
    agent = host.agent()
    await agent.start()
    attach_volume(
        host.stores.volumes, volume.id, "m1", app="vols", host_id=HOST.id, now=host.clock.now()
    )
    run = agent.submit_operation(volume_subject(volume.id), VolumeDeleteRequest())
    await settle(agent)
    await agent.close()
    [failed] = [r for r in host.stores.runs.list_runs(run.machine_id) if r.id == run.id]
    assert failed.status is RunStatus.FAILED
    assert "attached to machine m1" in failed.error
    record = host.volume(volume.id)
    assert record.state is VolumeState.CREATED and record.attached_machine_id == "m1"
    assert host.library.exists(volume.id)


BOOT_STEPS = ["attach_volumes", "prepare_initrd", "launch_vm"]


@pytest.mark.parametrize("step", BOOT_STEPS)
async def test_a_boot_crashed_after_a_volume_step_starts_with_its_volumes(
    host: VolumeHostFixture, step: str
) -> None:
    encrypted = step == "launch_vm"
    volume = await made(host, encrypted=encrypted)
    machine_id = host.add_machine([(volume.id, "/data")])
    await crash_then_finish(host, machine_id, CreateRequest(), step)
    assert host.machine(machine_id).state is MachineState.STARTED
    assert host.volume(volume.id).attached_machine_id == machine_id
    run_dir = host.tmp / "machines" / machine_id
    argv = json.loads((run_dir / ARGV_FILE).read_text())
    disks = [arg for arg in argv if f"serial={volume.id}" in arg]
    assert len(disks) == 1 and disks[0].startswith("virtio-blk-pci")
    assert any("encrypt.format=luks" in arg for arg in argv) == encrypted
    initrd = (run_dir / "initrd.img").read_bytes()
    assert f"HANGAR_VOLUME_0_SERIAL={volume.id}".encode() in initrd
    tools = ensure_volume_tools(SUITE_CACHE).read_bytes()
    assert tools in initrd, "the volume tools are in the initrd"
    no_leftovers(host.library)


@pytest.mark.parametrize(
    ("request_", "step"),
    [
        (StopRequest(timeout_s=0.0), "detach_volumes"),
        (DestroyRequest(force=True), "detach_volumes"),
    ],
)
async def test_stop_and_destroy_detach_even_when_crashed_there(
    host: VolumeHostFixture, request_: RunRequest, step: str
) -> None:
    volume = await made(host)
    machine_id = host.add_machine([(volume.id, "/data")])
    await run_to_end(host, machine_id, CreateRequest())
    assert host.volume(volume.id).attached_machine_id == machine_id
    await crash_then_finish(host, machine_id, request_, step)
    assert host.volume(volume.id).attached_machine_id is None
    assert host.machine(machine_id).state in (MachineState.STOPPED, MachineState.DESTROYED)


async def test_a_machine_cannot_start_with_a_volume_another_has(
    host: VolumeHostFixture,
) -> None:
    volume = await made(host)
    first = host.add_machine([(volume.id, "/data")])
    second = host.add_machine([(volume.id, "/data")])
    await run_to_end(host, first, CreateRequest())
    agent = host.agent()
    await agent.start()
    agent.submit_operation(second, CreateRequest())
    await settle(agent)
    await agent.close()
    refused = host.machine(second)
    assert refused.state is MachineState.FAILED
    assert f"attached to machine {first}" in refused.failure_reason
    assert host.volume(volume.id).attached_machine_id == first
    assert host.services().placement.claim_of(second) is None, "it gave back its claim"


@pytest.fixture
def manual_host(tmp_path: Path, test_image: str) -> Iterator[VolumeHostFixture]:
    stores = open_embedded_stores(tmp_path / "db")
    try:
        yield VolumeHostFixture(tmp_path, stores, test_image, ManualClock(start=1_800_000_000.0))
    finally:
        stores.close()


async def scheduled_pass(host: VolumeHostFixture) -> None:
    agent = host.agent()
    await agent.start()
    assert agent.volume_watch is not None
    agent.volume_watch.maintain_snapshots()
    await settle(agent)
    await agent.close()


def snapshot_ids(host: VolumeHostFixture, volume_id: str) -> list[str]:
    recorded = [s.id for s in host.volume(volume_id).snapshots]
    assert sorted(recorded) == sorted(s.id for s in host.library.snapshots(volume_id))
    return recorded


async def test_daily_snapshots_and_retention_follow_the_clock(
    manual_host: VolumeHostFixture,
) -> None:
    host = manual_host
    assert isinstance(host.clock, ManualClock)
    record = await made(host, snapshot_retention=2)
    await scheduled_pass(host)
    [first] = snapshot_ids(host, record.id)
    assert host.volume(record.id).snapshots[0].scheduled
    await scheduled_pass(host)
    assert snapshot_ids(host, record.id) == [first], "one a day"
    manual = new_snapshot_id()
    await run_to_end(host, volume_subject(record.id), VolumeSnapshotRequest(snapshot_id=manual))
    host.clock.advance(DAY_S)
    await scheduled_pass(host)
    [_, _, second] = snapshot_ids(host, record.id)
    host.clock.advance(DAY_S + 1)
    await scheduled_pass(host)
    third = snapshot_ids(host, record.id)[-1]
    assert snapshot_ids(host, record.id) == [second, third], "past 2 days: expired"

    no_backups = host.volume(record.id).model_copy(update={"auto_backup_enabled": False})
    assert host.stores.volumes.compare_and_set_volume(no_backups)
    host.clock.advance(3 * DAY_S)
    await scheduled_pass(host)
    assert snapshot_ids(host, record.id) == [], "expired; none taken with backups off"


async def test_reconcile_makes_unsubmitted_volumes_detaches_and_sweeps(
    host: VolumeHostFixture,
) -> None:
    library = host.library
    unsubmitted = host.record()
    held = await made(host)
    stopped = host.add_machine([(held.id, "/data")])
    attach_volume(host.stores.volumes, held.id, stopped, app="vols", host_id=HOST.id, now=1.0)
    library.layout.ensure_dirs()
    old_orphan = library.layout.image(new_volume_id())
    young_orphan = library.layout.image(new_volume_id())
    for orphan in (old_orphan, young_orphan):
        orphan.write_bytes(b"not a volume any record names")
    an_hour_ago = host.clock.now() - GRACE_S - 1
    os.utime(old_orphan, (an_hour_ago, an_hour_ago))
    os.utime(library.layout.image(held.id), (an_hour_ago, an_hour_ago))

    agent = host.agent()
    await agent.start()
    await settle(agent)
    await agent.close()
    assert host.volume(unsubmitted.id).state is VolumeState.CREATED
    assert library.info(unsubmitted.id).virtual_size == GIB
    assert host.volume(held.id).attached_machine_id is None, "its machine is not live"
    assert not old_orphan.exists() and young_orphan.exists()
    assert library.exists(held.id), "a file a record names is never removed"
