"""Suspend snapshots on disk: the saved state file, its manifest, and the checks before a
restore, for both tiers.

A snapshot at ``P`` is two files:

- ``P``: the saved machine. For a VM, QEMU's migration stream (the guest's memory and device
  state); for a sandbox-tier machine, gVisor's checkpoint image (``runsc checkpoint``: the
  sandbox's kernel state and memory). It is written to ``P.partial`` and renamed to ``P``
  once complete and read back;
- ``P.json``: the manifest, written last (``P.json.partial``, then renamed). It is the commit
  point: without it there is no snapshot, whatever else lies there, so a crash at any point
  of a suspend never leaves a snapshot that looks whole.

The manifest records what a restore must find again: for a VM (:class:`VmIdentity`) the
command line's device model (paths left out), the QEMU binary, the kernel and initrd by
content, and each disk by size and modification time (the saved guest's page cache belongs to
the disk exactly as it was left); for a sandbox (:class:`SandboxIdentity`) the runtime binary
and the OCI bundle's ``config.json`` by content (its process, mounts, namespaces, limits).
It also records the state file's size and CRC-32, checked before the state is loaded (while
QEMU loads it, for a VM).
Both files are 0600: the state holds the guest's memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from hangar.errors import VmmError
from hangar.vmm.accel import AccelChoice
from hangar.vmm.driver import VmSpec
from hangar.vmm.errors import SnapshotUnusable, SuspendFailed
from hangar.vmm.qemu_argv import snapshot_fingerprint

MANIFEST_SUFFIX = ".json"
PARTIAL_SUFFIX = ".partial"
MIGRATION_STREAM_MAGIC = b"QEVM"
"""The first four bytes of a QEMU migration stream (QEMU_VM_FILE_MAGIC)."""
CHECKPOINT_MAGIC = b"gVisorSF"
"""The first bytes of a gVisor checkpoint image (its state file header)."""
READ_CHUNK = 1 << 20
FILE_MODE = 0o600


@dataclass(frozen=True)
class SnapshotFiles:
    """The files of the snapshot at ``state``."""

    state: Path

    @property
    def manifest(self) -> Path:
        return self.state.with_name(self.state.name + MANIFEST_SUFFIX)

    @property
    def state_partial(self) -> Path:
        return self.state.with_name(self.state.name + PARTIAL_SUFFIX)

    @property
    def manifest_partial(self) -> Path:
        return self.manifest.with_name(self.manifest.name + PARTIAL_SUFFIX)

    @property
    def checkpoint_dir(self) -> Path:
        """A sandbox's checkpoint image folder: ``runsc checkpoint`` writes into it and
        ``runsc restore`` reads from it (its one file is moved to, and linked from, ``P``)."""
        return self.state.with_name(self.state.name + ".image")

    def all(self) -> tuple[Path, ...]:
        """Every file a snapshot at ``state`` may leave, the commit point first."""
        return (self.manifest, self.state, self.manifest_partial, self.state_partial)


class FileIdentity(BaseModel):
    """A file as a snapshot needs it unchanged: by content (``crc32``) or by ``mtime_ns``."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    crc32: int | None = None
    mtime_ns: int | None = None

    def same_file_as(self, other: FileIdentity) -> bool:
        """Equal but for the path (a restore may find the file elsewhere)."""
        return (self.size, self.crc32, self.mtime_ns) == (other.size, other.crc32, other.mtime_ns)


class VmIdentity(BaseModel):
    """What must be the same between the VM that was saved and the one that restores it."""

    model_config = ConfigDict(frozen=True)

    fingerprint: list[str]
    memory_mb: int
    qemu: FileIdentity
    kernel: FileIdentity
    initrd: FileIdentity
    disks: list[FileIdentity]


class SandboxIdentity(BaseModel):
    """What must be the same between the sandbox that was saved and the one restoring it."""

    model_config = ConfigDict(frozen=True)

    runtime: FileIdentity
    bundle_config: FileIdentity


class SnapshotManifest(BaseModel):
    """Exactly one of ``vm`` and ``sandbox``: the tier the snapshot was taken in."""

    model_config = ConfigDict(frozen=True)

    format: Literal[1] = 1
    machine_id: str
    created_at: float
    state_size: int
    state_crc32: int
    vm: VmIdentity | None = None
    sandbox: SandboxIdentity | None = None

    @model_validator(mode="after")
    def _one_tier(self) -> SnapshotManifest:
        if (self.vm is None) == (self.sandbox is None):
            raise ValueError("a snapshot is of a VM or of a sandbox")
        return self

    @property
    def magic(self) -> bytes:
        """The first bytes of its state file."""
        return MIGRATION_STREAM_MAGIC if self.vm is not None else CHECKPOINT_MAGIC


def crc32_of(path: Path) -> tuple[int, int]:
    """Size and CRC-32 of the file at ``path``."""
    size = 0
    crc = 0
    with path.open("rb") as file:
        while chunk := file.read(READ_CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def content_identity(path: Path) -> FileIdentity:
    size, crc = crc32_of(path)
    return FileIdentity(path=str(path), size=size, crc32=crc)


def stat_identity(path: Path) -> FileIdentity:
    info = path.stat()
    return FileIdentity(path=str(path), size=info.st_size, mtime_ns=info.st_mtime_ns)


def vm_identity(
    spec: VmSpec, accel: AccelChoice, *, binary: str, hugepages_dir: Path
) -> VmIdentity:
    """The identity of ``spec`` as it would run now (reads its kernel and initrd)."""
    resolved = shutil.which(binary)
    if resolved is None:
        raise VmmError(f"{binary} is not installed", binary=binary)
    disks = [spec.root_disk] + [disk.path for disk in spec.extra_disks]
    kernel, initrd = spec.boot_files
    return VmIdentity(
        fingerprint=snapshot_fingerprint(spec, accel, hugepages_dir=hugepages_dir),
        memory_mb=spec.memory_mb,
        qemu=stat_identity(Path(resolved).resolve()),
        kernel=content_identity(kernel),
        initrd=content_identity(initrd),
        disks=[stat_identity(path) for path in disks],
    )


def sandbox_identity(runtime_binary: str, bundle_config: Path) -> SandboxIdentity:
    """The identity of a sandbox about to run (or restore) ``bundle_config`` with
    ``runtime_binary``."""
    resolved = shutil.which(runtime_binary)
    if resolved is None:
        raise VmmError(f"{runtime_binary} is not installed", binary=runtime_binary)
    return SandboxIdentity(
        runtime=stat_identity(Path(resolved).resolve()),
        bundle_config=content_identity(bundle_config),
    )


def sandbox_mismatch(saved: SandboxIdentity | None, now: SandboxIdentity) -> str | None:
    """The first difference between a snapshot's sandbox and the one about to restore it."""
    if saved is None:
        return "it was taken of a VM"
    if not saved.runtime.same_file_as(now.runtime):
        return f"the runtime {now.runtime.path} changed"
    if not saved.bundle_config.same_file_as(now.bundle_config):
        return "the container's configuration differs (process, mounts, network or limits)"
    return None


def identity_mismatch(saved: VmIdentity | None, now: VmIdentity) -> str | None:
    """The first difference between a snapshot's VM and the one about to restore it."""
    if saved is None:
        return "it was taken of a sandbox"
    if saved.fingerprint != now.fingerprint:
        changed = sorted(set(saved.fingerprint) ^ set(now.fingerprint))
        return f"the command line differs ({' '.join(changed)[:300] or 'order'})"
    if not saved.qemu.same_file_as(now.qemu):
        return f"the QEMU binary {now.qemu.path} changed"
    for name, before, after in (
        ("kernel", saved.kernel, now.kernel),
        ("initrd", saved.initrd, now.initrd),
    ):
        if not before.same_file_as(after):
            return f"the {name} {after.path} is not the one the guest booted"
    for index, (before, after) in enumerate(zip(saved.disks, now.disks, strict=True)):
        if not before.same_file_as(after):
            which = "the root disk" if index == 0 else f"disk {index}"
            return f"{which} {after.path} changed after the snapshot was taken"
    return None


def read_manifest(state: Path) -> SnapshotManifest:
    """The manifest of the whole snapshot at ``state``; raises :class:`SnapshotUnusable`
    (``missing`` or ``corrupt``) when there is none. Reads only the manifest and the state
    file's size and first bytes."""
    files = SnapshotFiles(state)
    try:
        text = files.manifest.read_bytes()
    except FileNotFoundError:
        raise SnapshotUnusable(
            f"no suspend snapshot at {state}", reason="missing", path=str(state)
        ) from None
    try:
        manifest = SnapshotManifest.model_validate_json(text)
    except ValidationError as error:
        raise SnapshotUnusable(
            f"the snapshot manifest {files.manifest} is unreadable: "
            f"{error.errors()[0]['msg'] if error.errors() else error}",
            reason="corrupt",
            path=str(state),
        ) from error
    try:
        size = state.stat().st_size
        with state.open("rb") as file:
            magic = file.read(len(manifest.magic))
    except FileNotFoundError:
        raise SnapshotUnusable(
            f"the snapshot state file {state} is missing", reason="corrupt", path=str(state)
        ) from None
    if size != manifest.state_size:
        raise SnapshotUnusable(
            f"the snapshot state file {state} has {size} bytes, not {manifest.state_size}",
            reason="corrupt",
            path=str(state),
        )
    if magic != manifest.magic:
        what = "a QEMU migration stream" if manifest.vm is not None else "a gVisor checkpoint"
        raise SnapshotUnusable(
            f"the snapshot state file {state} is not {what}",
            reason="corrupt",
            path=str(state),
        )
    return manifest


def saved_before(state: Path, machine_id: str) -> SnapshotManifest:
    """A suspend run again after its VMM had ended: the snapshot an earlier run committed, or
    :class:`SuspendFailed` (nothing runs and nothing was saved)."""
    try:
        return read_manifest(state)
    except SnapshotUnusable:
        raise SuspendFailed(
            f"machine {machine_id} is not running: nothing to suspend",
            resumed=False,
            machine_id=machine_id,
        ) from None


def has_snapshot(state: Path) -> bool:
    """Is there a whole snapshot at ``state``? (Its content is checked only on restore.)"""
    try:
        read_manifest(state)
    except SnapshotUnusable:
        return False
    return True


def check_state_crc(state: Path, manifest: SnapshotManifest) -> None:
    """Raise :class:`SnapshotUnusable` (``corrupt``) unless the state file matches its CRC."""
    size, crc = crc32_of(state)
    if (size, crc) != (manifest.state_size, manifest.state_crc32):
        raise SnapshotUnusable(
            f"the snapshot state file {state} does not match its checksum",
            reason="corrupt",
            path=str(state),
        )


def check_restorable(
    state: Path, manifest: SnapshotManifest, mismatch: str | None, machine_id: str
) -> None:
    """Raise :class:`SnapshotUnusable` if the machine about to restore the snapshot differs
    from the saved one (``mismatch``, from :func:`identity_mismatch` or
    :func:`sandbox_mismatch`) or the state file does not match its checksum."""
    if mismatch is not None:
        raise SnapshotUnusable(
            f"the snapshot {state} cannot be restored: {mismatch}",
            reason="incompatible",
            path=str(state),
            machine_id=machine_id,
        )
    check_state_crc(state, manifest)


def create_partial_state(state: Path) -> Path:
    """An empty, private ``P.partial`` for QEMU to write into (whatever was there is gone)."""
    partial = SnapshotFiles(state).state_partial
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    return partial


def commit_snapshot(
    state: Path,
    *,
    machine_id: str,
    now: float,
    vm: VmIdentity | None = None,
    sandbox: SandboxIdentity | None = None,
) -> SnapshotManifest:
    """Make the completed ``P.partial`` the snapshot at ``state`` of a VM or a sandbox: read
    it back for its checksum, sync it, rename it, then write the manifest (the commit
    point)."""
    files = SnapshotFiles(state)
    _fsync_file(files.state_partial)
    size, crc = crc32_of(files.state_partial)
    manifest = SnapshotManifest(
        machine_id=machine_id,
        created_at=now,
        state_size=size,
        state_crc32=crc,
        vm=vm,
        sandbox=sandbox,
    )
    files.state_partial.rename(state)
    descriptor = os.open(
        files.manifest_partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE
    )
    with os.fdopen(descriptor, "wb") as out:
        out.write(manifest.model_dump_json(indent=1).encode())
        out.flush()
        os.fsync(out.fileno())
    files.manifest_partial.rename(files.manifest)
    _fsync_dir(state.parent)
    return manifest


def revoke_snapshot(state: Path) -> None:
    """Remove the commit point: from now on there is no snapshot at ``state`` (the rest
    goes with :func:`drop_snapshot`)."""
    SnapshotFiles(state).manifest.unlink(missing_ok=True)
    _fsync_dir(state.parent)


def drop_snapshot(state: Path) -> bool:
    """Remove the snapshot at ``state`` and anything a cut-short suspend left; the manifest
    goes first, so what is left at any moment never looks whole. True if a whole one was
    there."""
    files = SnapshotFiles(state)
    was_whole = has_snapshot(state)
    for path in files.all():
        path.unlink(missing_ok=True)
    shutil.rmtree(files.checkpoint_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        _fsync_dir(state.parent)
    return was_whole


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
