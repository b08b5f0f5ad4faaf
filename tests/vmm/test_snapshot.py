"""Snapshot files on disk: what counts as whole, what a restore checks, what is dropped.

No QEMU here: the state file is a stand-in that starts as a migration stream does. Real
snapshots are taken and restored in test_suspend.py.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from hangar.vmm.accel import kvm_choice, tcg_choice
from hangar.vmm.driver import VmSpec
from hangar.vmm.errors import SnapshotUnusable
from hangar.vmm.qemu_argv import HUGEPAGES_DIR, QEMU_BINARY
from hangar.vmm.snapshot import (
    MIGRATION_STREAM_MAGIC,
    SnapshotFiles,
    check_state_crc,
    commit_snapshot,
    create_partial_state,
    drop_snapshot,
    has_snapshot,
    identity_mismatch,
    read_manifest,
    revoke_snapshot,
    vm_identity,
)
from tests.vmm.machines import plain_spec

TCG = tcg_choice("test")
STATE_BYTES = MIGRATION_STREAM_MAGIC + bytes(range(256)) * 64

needs_qemu = pytest.mark.skipif(
    shutil.which(QEMU_BINARY) is None, reason=f"{QEMU_BINARY} is not installed"
)


def make_spec(root: Path, name: str = "run") -> VmSpec:
    spec = plain_spec(root / name)
    spec.run_dir.mkdir()
    for path, content in ((spec.kernel, b"kernel"), (spec.initrd, b"initrd")):
        path.write_bytes(content)
    spec.root_disk.write_bytes(b"\0" * 4096)
    return spec


def take_snapshot(spec: VmSpec, state: Path) -> None:
    """What QemuDriver.suspend does around QEMU's migration: a partial, filled, committed."""
    partial = create_partial_state(state)
    partial.write_bytes(STATE_BYTES)
    vm = vm_identity(spec, TCG, binary=QEMU_BINARY, hugepages_dir=HUGEPAGES_DIR)
    commit_snapshot(state, machine_id=spec.machine_id, vm=vm, now=1.0)


@needs_qemu
def test_a_committed_snapshot_is_whole_and_private(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    state = spec.run_dir / "snapshot"

    take_snapshot(spec, state)

    manifest = read_manifest(state)
    assert manifest.state_size == len(STATE_BYTES)
    assert manifest.vm.memory_mb == spec.memory_mb
    assert has_snapshot(state)
    check_state_crc(state, manifest)
    files = SnapshotFiles(state)
    for path in (state, files.manifest):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not files.state_partial.exists()
    assert not files.manifest_partial.exists()


@needs_qemu
def test_no_manifest_no_snapshot_whatever_else_lies_there(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    state = spec.run_dir / "snapshot"
    files = SnapshotFiles(state)
    # As a suspend cut short at each point leaves it: QEMU writing, state renamed, manifest
    # being written.
    create_partial_state(state).write_bytes(STATE_BYTES)
    assert not has_snapshot(state)
    files.state_partial.rename(state)
    assert not has_snapshot(state)
    files.manifest_partial.write_text("{")
    assert not has_snapshot(state)

    with pytest.raises(SnapshotUnusable) as raised:
        read_manifest(state)

    assert raised.value.reason == "missing"
    assert raised.value.retryable is False
    assert drop_snapshot(state) is False
    assert list(spec.run_dir.glob("snapshot*")) == []


@needs_qemu
@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("manifest", "unreadable"),
        ("state_missing", "missing"),
        ("state_short", "bytes"),
        ("state_magic", "not a QEMU migration stream"),
    ],
)
def test_a_damaged_snapshot_is_corrupt(tmp_path: Path, damage: str, words: str) -> None:
    spec = make_spec(tmp_path)
    state = spec.run_dir / "snapshot"
    take_snapshot(spec, state)
    if damage == "manifest":
        SnapshotFiles(state).manifest.write_text('{"format": 1}')
    elif damage == "state_missing":
        state.unlink()
    elif damage == "state_short":
        state.write_bytes(STATE_BYTES[:-1])
    else:
        state.write_bytes(b"XXXX" + STATE_BYTES[4:])

    with pytest.raises(SnapshotUnusable) as raised:
        read_manifest(state)

    assert raised.value.reason == "corrupt"
    assert words in str(raised.value)
    assert not has_snapshot(state)


@needs_qemu
def test_a_flipped_byte_fails_the_checksum(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    state = spec.run_dir / "snapshot"
    take_snapshot(spec, state)
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    manifest = read_manifest(state)  # the size and the magic still fit

    with pytest.raises(SnapshotUnusable) as raised:
        check_state_crc(state, manifest)

    assert raised.value.reason == "corrupt"


@needs_qemu
def test_revoking_leaves_no_snapshot_and_dropping_leaves_no_file(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    state = spec.run_dir / "snapshot"
    take_snapshot(spec, state)

    revoke_snapshot(state)

    assert not has_snapshot(state)
    assert state.exists()
    take_snapshot(spec, state)
    assert drop_snapshot(state) is True
    assert list(spec.run_dir.glob("snapshot*")) == []


@needs_qemu
def test_the_same_files_elsewhere_fit_the_snapshot(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    saved = vm_identity(spec, TCG, binary=QEMU_BINARY, hugepages_dir=HUGEPAGES_DIR)
    moved = plain_spec(tmp_path / "moved")
    shutil.copytree(spec.run_dir, moved.run_dir, copy_function=shutil.copy2)

    now = vm_identity(moved, TCG, binary=QEMU_BINARY, hugepages_dir=HUGEPAGES_DIR)

    assert identity_mismatch(saved, now) is None


@needs_qemu
@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("memory", "command line differs"),
        ("accel", "command line differs"),
        ("kernel", "kernel"),
        ("initrd", "initrd"),
        ("root_disk", "root disk"),
    ],
)
def test_what_a_snapshot_cannot_survive(tmp_path: Path, change: str, words: str) -> None:
    spec = make_spec(tmp_path)
    saved = vm_identity(spec, TCG, binary=QEMU_BINARY, hugepages_dir=HUGEPAGES_DIR)
    accel = TCG
    if change == "memory":
        spec = spec.model_copy(update={"memory_mb": spec.memory_mb * 2})
    elif change == "accel":
        accel = kvm_choice("test")
    elif change in ("kernel", "initrd"):
        getattr(spec, change).write_bytes(b"rebuilt")
    else:
        info = spec.root_disk.stat()
        os.utime(spec.root_disk, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))

    now = vm_identity(spec, accel, binary=QEMU_BINARY, hugepages_dir=HUGEPAGES_DIR)

    mismatch = identity_mismatch(saved, now)
    assert mismatch is not None
    assert words in mismatch
