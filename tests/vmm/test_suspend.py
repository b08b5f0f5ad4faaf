"""Suspend and restore of real guests (hangar's init over the busybox test image): the guest
carries on where it was, snapshots that cannot be restored are refused and dropped, and a
suspend cut short at any point leaves no snapshot that looks whole."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from hangar.errors import Unprocessable
from hangar.vmm.accel import AccelChoice
from hangar.vmm.driver import VmHandle, VmSpec
from hangar.vmm.errors import SnapshotUnusable, SuspendFailed, SuspendNotSupported
from hangar.vmm.proc import PROC_ROOT, ProcessRef
from hangar.vmm.qemu import QemuDriver, QemuTimeouts
from hangar.vmm.snapshot import SnapshotFiles, has_snapshot
from tests.vmm.guest import ImageGuest, hang_guarded, wait_for_console
from tests.vmm.machines import Machines, handle_for, plain_spec

pytestmark = pytest.mark.slow

COUNTER = ["sh", "-c", 'i=0; while :; do echo "tick $i"; i=$((i + 1)); sleep 0.2; done']
TIMEOUT_S = 60.0
SLOW_MIGRATION = 2 << 20
"""Bytes a second: slow enough that a test can cut a suspend short in its middle."""
MIB = 1 << 20


def ticks(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"^tick (\d+)\r?$", text, re.MULTILINE)]


async def boot_counter(driver: QemuDriver, machines: Machines, spec: VmSpec) -> VmHandle:
    handle = machines.track(await driver.launch(spec))
    await wait_for_console(spec.console_log, lambda text: "tick 2\n" in text)
    return handle


def restoring(spec: VmSpec, state: Path, **changes: object) -> VmSpec:
    return spec.model_copy(update={"incoming_snapshot": state, **changes})


def copy_snapshot(state: Path, copy: Path) -> Path:
    for source, destination in ((state, copy), (SnapshotFiles(state).manifest, None)):
        target = destination or SnapshotFiles(copy).manifest
        shutil.copyfile(source, target)
    return copy


def snapshot_files_left(state: Path) -> list[Path]:
    return [path for path in SnapshotFiles(state).all() if path.exists()]


async def uptime(driver: QemuDriver, handle: VmHandle) -> float:
    result = await driver.exec(handle, ["cat", "/proc/uptime"], timeout_s=TIMEOUT_S)
    return float(result.stdout.split()[0])


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (QEMU's migration writer: a shell and its cat)."""
    parents: dict[int, int] = {}
    for entry in PROC_ROOT.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 1 :].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, of in parents.items() if of == parent]
        found += children
        frontier += children
    return found


async def wait_mid_migration(state: Path) -> None:
    partial = SnapshotFiles(state).state_partial
    while not (partial.exists() and partial.stat().st_size > MIB):
        await asyncio.sleep(0.05)


@hang_guarded
async def test_a_suspended_guest_resumes_where_it_was(
    machines: Machines, image_guest: ImageGuest, host_accel: AccelChoice
) -> None:
    driver = QemuDriver(accel=host_accel)
    spec = machines.image_spec("resume", image_guest, COUNTER)
    handle = await boot_counter(driver, machines, spec)
    await driver.exec(
        handle, ["sh", "-c", "echo kept in memory >/dev/shm/marker"], timeout_s=TIMEOUT_S
    )
    uptime_before = await uptime(driver, handle)
    (main_before,) = [p for p in await driver.processes(handle) if p.argv == COUNTER]
    # A clock the resume must put right.
    await driver.exec(handle, ["date", "-s", "@1000000000"], timeout_s=TIMEOUT_S)
    state = spec.run_dir / "suspend.vmstate"

    manifest = await driver.suspend(handle, state)

    assert not driver.is_running(handle)
    assert has_snapshot(state)
    assert state.stat().st_size == manifest.state_size
    assert manifest.state_size < spec.memory_mb * MIB
    assert snapshot_files_left(state) == [SnapshotFiles(state).manifest, state]
    assert await driver.suspend(handle, state) == manifest  # run again: nothing to do
    console_at_suspend = spec.console_log.read_text()
    last_tick = ticks(console_at_suspend)[-1]

    restored = machines.track(await driver.launch(restoring(spec, state)))

    text = await wait_for_console(spec.console_log, lambda t: f"tick {last_tick + 3}\n" in t)
    after = text[len(console_at_suspend) :]
    assert ticks(after)[0] == last_tick + 1  # it goes on counting, from where it was
    assert "hangar-init: resumed" in after
    assert "hangar-init: ready" not in after
    assert snapshot_files_left(state) == []  # consumed: never restored twice
    marker = await driver.exec(restored, ["cat", "/dev/shm/marker"], timeout_s=TIMEOUT_S)
    assert marker.stdout == b"kept in memory\n"
    assert await uptime(driver, restored) >= uptime_before
    guest_clock = await driver.exec(restored, ["date", "+%s"], timeout_s=TIMEOUT_S)
    assert abs(int(guest_clock.stdout) - time.time()) < TIMEOUT_S
    (main_after,) = [p for p in await driver.processes(restored) if p.argv == COUNTER]
    assert (main_after.pid, main_after.started_after_boot_s) == (
        main_before.pid,
        main_before.started_after_boot_s,
    )
    status = await driver.status(restored)
    assert (status.state, status.guest_ready, status.exit_code) == ("running", True, None)


@hang_guarded
async def test_snapshots_that_cannot_be_restored_are_refused_and_dropped(
    machines: Machines, image_guest: ImageGuest, host_accel: AccelChoice
) -> None:
    driver = QemuDriver(accel=host_accel)
    spec = machines.image_spec("refuse", image_guest, COUNTER)
    handle = await boot_counter(driver, machines, spec)
    state = spec.run_dir / "suspend.vmstate"
    await driver.suspend(handle, state)
    corrupt = copy_snapshot(state, spec.run_dir / "corrupt.vmstate")
    with corrupt.open("r+b") as file:
        file.seek(corrupt.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))
    other_memory = copy_snapshot(state, spec.run_dir / "other.vmstate")
    other_disk = copy_snapshot(state, spec.run_dir / "disk.vmstate")

    cases = [
        (restoring(spec, spec.run_dir / "never-taken"), "missing"),
        (restoring(spec, corrupt), "corrupt"),
        (restoring(spec, other_memory, memory_mb=spec.memory_mb * 2), "incompatible"),
        (restoring(spec, other_disk, root_disk=spec.run_dir / "gone.ext4"), "incompatible"),
    ]
    for restore_spec, reason in cases:
        assert restore_spec.incoming_snapshot is not None
        with pytest.raises(SnapshotUnusable) as raised:
            await driver.launch(restore_spec)
        assert raised.value.reason == reason
        assert snapshot_files_left(restore_spec.incoming_snapshot) == []

    # None of that touched the machine's own snapshot or its disk.
    restored = machines.track(await driver.launch(restoring(spec, state)))
    result = await driver.exec(restored, ["echo", "still here"], timeout_s=TIMEOUT_S)
    assert result.stdout == b"still here\n"


async def test_machines_with_gpus_cannot_be_suspended(tmp_path: Path) -> None:
    handle = handle_for(plain_spec(tmp_path, gpus=["0000:65:00.0"]), pid=os.getpid())

    with pytest.raises(SuspendNotSupported) as raised:
        await QemuDriver().suspend(handle, tmp_path / "state")

    assert isinstance(raised.value, Unprocessable)
    assert raised.value.http_status == 422
    assert raised.value.fields["field"] == "config.guest.gpus"
    assert not (tmp_path / "state").exists()


@hang_guarded
async def test_a_suspend_cut_short_leaves_no_snapshot_and_the_guest_runs_on(
    machines: Machines, image_guest: ImageGuest, host_accel: AccelChoice
) -> None:
    slow = QemuDriver(accel=host_accel, migration_bandwidth=SLOW_MIGRATION)
    driver = QemuDriver(accel=host_accel)
    spec = machines.image_spec("cut", image_guest, COUNTER)
    handle = await boot_counter(driver, machines, spec)
    state = spec.run_dir / "suspend.vmstate"

    # The save outlasts its deadline: it is cancelled and the guest goes on.
    hurried = QemuDriver(
        accel=host_accel,
        migration_bandwidth=SLOW_MIGRATION,
        timeouts=QemuTimeouts(migrate_base_s=1.0, migrate_per_gib_s=0.0),
    )
    with pytest.raises(SuspendFailed) as raised:
        await hurried.suspend(handle, state)
    assert raised.value.resumed
    assert snapshot_files_left(state) == []
    last_tick = ticks(spec.console_log.read_text())[-1]
    await wait_for_console(spec.console_log, lambda text: f"tick {last_tick + 2}\n" in text)

    # The writer dies in the middle: the suspend fails and the guest goes on.
    suspending = asyncio.ensure_future(slow.suspend(handle, state))
    await wait_mid_migration(state)
    for pid in descendants(handle.pid):
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(SuspendFailed) as raised:
        await suspending
    assert raised.value.resumed
    assert snapshot_files_left(state) == []
    last_tick = ticks(spec.console_log.read_text())[-1]
    await wait_for_console(spec.console_log, lambda text: f"tick {last_tick + 2}\n" in text)

    # The caller dies in the middle (QEMU goes on migrating): a run again completes it.
    suspending = asyncio.ensure_future(slow.suspend(handle, state))
    await wait_mid_migration(state)
    suspending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await suspending
    assert not has_snapshot(state)
    assert driver.is_running(handle)
    await driver.suspend(handle, state)
    assert has_snapshot(state)
    assert not driver.is_running(handle)

    restored = machines.track(await driver.launch(restoring(spec, state)))
    result = await driver.exec(restored, ["echo", "back"], timeout_s=TIMEOUT_S)
    assert result.stdout == b"back\n"


@hang_guarded
async def test_qemu_killed_in_the_middle_of_a_suspend_leaves_no_snapshot(
    machines: Machines, image_guest: ImageGuest, host_accel: AccelChoice
) -> None:
    slow = QemuDriver(accel=host_accel, migration_bandwidth=SLOW_MIGRATION)
    spec = machines.image_spec("killed", image_guest, COUNTER)
    handle = await boot_counter(slow, machines, spec)
    state = spec.run_dir / "suspend.vmstate"

    suspending = asyncio.ensure_future(slow.suspend(handle, state))
    await wait_mid_migration(state)
    process = ProcessRef.open(handle.pid, handle.start_time)
    assert process is not None
    with process:
        process.send_signal(signal.SIGKILL)
        await process.wait_exited()

    with pytest.raises(SuspendFailed) as raised:
        await suspending
    assert not raised.value.resumed
    assert snapshot_files_left(state) == []
    with pytest.raises(SuspendFailed):
        await slow.suspend(handle, state)
    with pytest.raises(SnapshotUnusable) as unusable:
        await slow.launch(restoring(spec, state))
    assert unusable.value.reason == "missing"
