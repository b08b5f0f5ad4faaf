"""Volumes of sandbox-tier machines: the volume's filesystem mounted on the host and bound
into the container.

A VM opens its volume's qcow2 image (LUKS-encrypted in QEMU's userspace) as a disk and its
guest init mounts it. A container has no kernel of its own, and this host has no
device-mapper to decrypt an image in the kernel, so the host does the guest's part with
userspace parts only:

1. ``qemu-storage-daemon`` opens the image exactly as a VM's QEMU does (the same block
   nodes, named after the volume) and exports it over FUSE as a raw file;
2. a loop device over that file;
3. ext4 on it: formatted on first use (a blank disk only; a disk holding anything else is
   never formatted), grown to the disk's size, mounted ``nodev,nosuid``; an extend while
   mounted grows it at once where ext4 may be resized online (``CAP_SYS_RESOURCE``), else
   at the next mount;
4. the mounted folder is bound into the container at the mount's path.

Each volume mounted this way has a folder of its own under a short state root in ``/run``
(it holds the daemon's monitor socket): ``export`` (the FUSE file), ``fs/`` (the mount
point), ``qmp`` (the daemon's monitor: online resize and snapshots go through it as through
a VM's QEMU), ``pid`` and ``owner`` (the machine it is mounted for). Every operation is
idempotent, so a step cut short by a crash is simply run again; :meth:`HostMounts.unmount`
undoes whatever part exists, in reverse order. Nothing of this lives in a machine's run
folder, which is removed with ``rmtree`` (a mounted volume there would be emptied with it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hangar.errors import VolumeError
from hangar.images.runner import CommandError, CommandRunner, run_command
from hangar.localhost import short_state_dir
from hangar.vmm.driver import VolumeDiskSpec
from hangar.vmm.proc import read_process
from hangar.vmm.qemu_argv import option_value, volume_block_nodes, volume_node_name
from hangar.volumes.model import check_volume_id

STATE_ROOT_BASE = Path("/run/hangar-volumes")
QSD = "qemu-storage-daemon"
COMMAND_TIMEOUT_S = 120.0
"""For one command (the daemon's start, losetup, mkfs, mount, resize2fs, umount)."""
EXIT_WAIT_S = 10.0
"""How long the daemon has to exit after SIGTERM before it is killed."""
SIZE_WAIT_S = 10.0
"""How long a resize waits for the loop device to see the disk's new size (the FUSE file's
attributes are cached for a second)."""
POLL_S = 0.05
BLANK_CHECK_BYTES = 1 << 20
"""A disk whose first MiB is zeros holds no filesystem (where any keeps its signature)."""
EXT_MAGIC_OFFSET = 1080
EXT_MAGIC = b"\x53\xef"
MOUNT_OPTIONS = "nodev,nosuid"
E2FSCK_CORRECTED = 1
"""e2fsck's exit status when it corrected errors (0: there were none)."""
CAP_SYS_RESOURCE = 24
"""The capability ext4 asks of whoever grows it while mounted."""
PRIVATE_DIR_MODE = 0o700


def state_root_for(volumes_root: Path) -> Path:
    """The state folder of the volumes under ``volumes_root``: short (it holds unix
    sockets) and distinct per volume folder."""
    return short_state_dir(STATE_ROOT_BASE, volumes_root)


@dataclass(frozen=True)
class MountPaths:
    """The files of one volume mounted on the host."""

    folder: Path

    @property
    def export(self) -> Path:
        return self.folder / "export"

    @property
    def fs(self) -> Path:
        return self.folder / "fs"

    @property
    def qmp(self) -> Path:
        return self.folder / "qmp"

    @property
    def pid(self) -> Path:
        return self.folder / "pid"

    @property
    def owner(self) -> Path:
        return self.folder / "owner"


def has_capability(bit: int, status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process holds capability ``bit`` (``CapEff`` in its status)."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def _mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point, a FUSE mount whose daemon is gone included."""
    target = os.fsencode(path.resolve(strict=False))
    with open("/proc/self/mounts", "rb") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1 and _unescape(fields[1]) == target:
                return True
    return False


def _unescape(field: bytes) -> bytes:
    """A path as /proc/self/mounts writes it (space, tab, newline, backslash octal-escaped)."""
    for escaped, plain in ((b"\\040", b" "), (b"\\011", b"\t"), (b"\\012", b"\n")):
        field = field.replace(escaped, plain)
    return field.replace(b"\\134", b"\\")


class HostMounts:
    """The volumes this host has mounted for sandbox-tier machines."""

    def __init__(
        self,
        state_root: Path,
        *,
        runner: CommandRunner = run_command,
        qsd_binary: str = QSD,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        online_resize: bool | None = None,
    ) -> None:
        """``online_resize``: whether a mounted filesystem can be grown (None: whether this
        process holds ``CAP_SYS_RESOURCE``; some container hosts withhold it)."""
        self.state_root = state_root
        self._run = runner
        self._qsd = qsd_binary
        self._sleep = sleep
        self._monotonic = monotonic
        self._online_resize = online_resize

    def _can_resize_online(self) -> bool:
        if self._online_resize is None:
            self._online_resize = has_capability(CAP_SYS_RESOURCE)
        return self._online_resize

    def paths(self, volume_id: str) -> MountPaths:
        return MountPaths(self.state_root / check_volume_id(volume_id))

    # ---- reads -------------------------------------------------------------------------

    def owners(self) -> dict[str, str]:
        """Volume id -> the machine it is (or was being) mounted for, for every volume
        with any part mounted ("" where a crash came before the owner was written)."""
        if not self.state_root.is_dir():
            return {}
        found: dict[str, str] = {}
        for folder in sorted(self.state_root.iterdir()):
            with contextlib.suppress(ValueError):
                paths = self.paths(folder.name)
                try:
                    found[folder.name] = paths.owner.read_text().strip()
                except OSError:
                    found[folder.name] = ""  # cut short before its owner was written
        return found

    def owned_by(self, machine_id: str) -> list[str]:
        return sorted(v for v, owner in self.owners().items() if owner == machine_id)

    def daemon_pid(self, volume_id: str) -> int | None:
        """The storage daemon's pid while it runs for this volume."""
        paths = self.paths(volume_id)
        try:
            pid = int(paths.pid.read_text().strip())
        except (OSError, ValueError):
            return None
        info = read_process(pid)
        if info is None or info.exited or str(paths.export) not in " ".join(info.cmdline):
            return None
        return pid

    def qmp_socket(self, volume_id: str) -> Path | None:
        """The monitor of the daemon that has the volume open, if one has."""
        if self.daemon_pid(volume_id) is None:
            return None
        return self.paths(volume_id).qmp

    def mounted(self, volume_id: str, machine_id: str | None = None) -> bool:
        """Whether the volume's filesystem is mounted (for ``machine_id``, if given)."""
        paths = self.paths(volume_id)
        if not paths.folder.is_dir() or not _mounted(paths.fs):
            return False
        if machine_id is None:
            return True
        try:
            return paths.owner.read_text().strip() == machine_id
        except OSError:
            return False

    # ---- mount ---------------------------------------------------------------------------

    def mount(self, disk: VolumeDiskSpec, machine_id: str) -> Path:
        """Mount the volume ``disk`` for ``machine_id`` and return the folder to bind into
        its container. Each part already there is kept. The disk's key file is read by the
        daemon at its start (the caller removes it after)."""
        volume_id = disk.name
        paths = self.paths(volume_id)
        owner = self.owners().get(volume_id)
        if owner is not None and owner != machine_id:
            raise VolumeError(
                f"volume {volume_id} is mounted on this host for machine {owner}",
                retryable=True,
                volume_id=volume_id,
                machine_id=owner,
            )
        self.state_root.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        paths.folder.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        paths.owner.write_text(machine_id + "\n")
        if self.daemon_pid(volume_id) is None:
            self._start_daemon(disk, paths)
        loop = self._loop_device(paths) or self._attach_loop(paths)
        if not _mounted(paths.fs):
            self._format_if_blank(volume_id, loop)
            self._grow_unmounted(volume_id, loop)
            paths.fs.mkdir(mode=0o755, exist_ok=True)
            self._command(
                ["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, loop, str(paths.fs)],
                volume_id,
                "mount its filesystem",
            )
        return paths.fs

    def _start_daemon(self, disk: VolumeDiskSpec, paths: MountPaths) -> None:
        """The daemon, as a VM's QEMU opens the volume (``hangar.vmm.qemu_argv``), with a
        FUSE export of it; ``--daemonize`` returns once the export is there."""
        node = volume_node_name(disk.name)
        self._unmount_export(paths)
        paths.pid.unlink(missing_ok=True)
        paths.qmp.unlink(missing_ok=True)
        paths.export.touch(mode=0o600, exist_ok=True)
        argv = [self._qsd]
        argv += [
            word for option, value in volume_block_nodes(disk) for word in (f"--{option}", value)
        ]
        argv += [
            "--export",
            f"type=fuse,id={node}-export,node-name={node},"
            f"mountpoint={option_value(paths.export)},writable=on",
            "--chardev",
            f"socket,id=monitor,path={option_value(paths.qmp)},server=on,wait=off",
            "--monitor",
            "chardev=monitor",
            "--pidfile",
            str(paths.pid),
            "--daemonize",
        ]
        self._command(argv, disk.name, "open its image")

    def _loop_device(self, paths: MountPaths) -> str | None:
        """The loop device over the volume's export, if one is attached."""
        try:
            out = self._run(
                ["losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list"],
                timeout=COMMAND_TIMEOUT_S,
            )
        except CommandError:
            return None
        for line in out.splitlines():
            name, _, back = line.strip().partition(" ")
            if back.strip() == str(paths.export):
                return name
        return None

    def _attach_loop(self, paths: MountPaths) -> str:
        out = self._command(
            ["losetup", "--find", "--show", str(paths.export)],
            paths.folder.name,
            "attach a loop device",
        )
        return out.strip()

    def _format_if_blank(self, volume_id: str, loop: str) -> None:
        with open(loop, "rb") as device:
            head = device.read(BLANK_CHECK_BYTES)
        if head.count(0) == len(head):
            self._command(["mkfs.ext4", "-q", "-F", loop], volume_id, "format it")
            return
        if head[EXT_MAGIC_OFFSET : EXT_MAGIC_OFFSET + 2] != EXT_MAGIC:
            raise VolumeError(
                f"volume {volume_id} holds something other than an ext4 filesystem; it is "
                "never formatted over",
                retryable=False,
                volume_id=volume_id,
            )

    def _grow_unmounted(self, volume_id: str, loop: str) -> None:
        """Grow the filesystem to the disk's size before it is mounted, if the disk grew
        (``resize2fs`` wants a checked filesystem first)."""
        if self._fs_bytes(volume_id, loop) >= self._device_bytes(volume_id, loop):
            return
        try:
            self._run(["e2fsck", "-f", "-p", loop], timeout=COMMAND_TIMEOUT_S)
        except CommandError as error:
            if error.returncode != E2FSCK_CORRECTED:
                raise VolumeError(
                    f"volume {volume_id}: its filesystem has errors e2fsck could not correct: "
                    f"{error}",
                    retryable=False,
                    volume_id=volume_id,
                ) from error
        self._command(["resize2fs", loop], volume_id, "grow its filesystem")

    def _fs_bytes(self, volume_id: str, loop: str) -> int:
        header = self._command(["dumpe2fs", "-h", loop], volume_id, "read its filesystem")
        fields = {
            name.strip(): value.strip()
            for name, _, value in (line.partition(":") for line in header.splitlines())
        }
        try:
            return int(fields["Block count"]) * int(fields["Block size"])
        except (KeyError, ValueError) as error:
            raise VolumeError(
                f"volume {volume_id}: dumpe2fs gave no block count", retryable=False
            ) from error

    def _device_bytes(self, volume_id: str, loop: str) -> int:
        return int(self._command(["blockdev", "--getsize64", loop], volume_id, "read its size"))

    # ---- while mounted -------------------------------------------------------------------

    def grow(self, volume_id: str, size: int) -> bool:
        """After the image grew to ``size`` bytes (QMP ``block_resize`` on the daemon): the
        loop device sees the new size, and the mounted filesystem grows to it, where this
        process may resize a mounted ext4 (``CAP_SYS_RESOURCE``); elsewhere it grows at the
        next mount. Whether it grew now."""
        loop = self._loop_device(self.paths(volume_id))
        if loop is None or not self.mounted(volume_id):
            return False
        deadline = self._monotonic() + SIZE_WAIT_S
        while True:
            self._command(["losetup", "--set-capacity", loop], volume_id, "see its new size")
            current = self._device_bytes(volume_id, loop)
            if current >= size:
                break
            if self._monotonic() >= deadline:
                raise VolumeError(
                    f"volume {volume_id}: its loop device still shows {current} bytes, not {size}",
                    retryable=True,
                    volume_id=volume_id,
                )
            self._sleep(POLL_S)
        if not self._can_resize_online():
            return False
        self._command(["resize2fs", loop], volume_id, "grow its filesystem")
        return True

    def waits_for_remount(self, volume_id: str) -> bool:
        """Whether the volume is mounted with a filesystem smaller than its disk (grown
        while mounted where ext4 could not be resized online): its machine sees the new
        size after a restart."""
        loop = self._loop_device(self.paths(volume_id))
        if loop is None or not self.mounted(volume_id):
            return False
        return self._fs_bytes(volume_id, loop) < self._device_bytes(volume_id, loop)

    def sync(self, volume_id: str) -> None:
        """Write what the host caches of the mounted filesystem down to the image (before a
        snapshot)."""
        if self.mounted(volume_id):
            self._command(
                ["sync", "--file-system", str(self.paths(volume_id).fs)],
                volume_id,
                "sync its filesystem",
            )

    # ---- unmount -------------------------------------------------------------------------

    def unmount(self, volume_id: str) -> None:
        """Undo every part of the volume's mount that exists: the filesystem, the loop
        device, the daemon (its writes flushed as it exits), the export, the folder."""
        paths = self.paths(volume_id)
        if not paths.folder.exists():
            return
        if _mounted(paths.fs):
            self._command(["umount", str(paths.fs)], volume_id, "unmount its filesystem")
        loop = self._loop_device(paths)
        if loop is not None:
            self._command(["losetup", "--detach", loop], volume_id, "detach its loop device")
        self._stop_daemon(volume_id)
        self._unmount_export(paths)
        shutil.rmtree(paths.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.state_root.rmdir()  # the last one

    def _stop_daemon(self, volume_id: str) -> None:
        pid = self.daemon_pid(volume_id)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = self._monotonic() + EXIT_WAIT_S
        while self.daemon_pid(volume_id) is not None:
            if self._monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            self._sleep(POLL_S)

    def _unmount_export(self, paths: MountPaths) -> None:
        """The export's FUSE mount, left behind by a daemon that ended without removing it."""
        if _mounted(paths.export):
            self._command(["umount", str(paths.export)], paths.folder.name, "drop its export")

    def _command(self, argv: list[str], volume_id: str, what: str) -> str:
        try:
            return self._run(argv, timeout=COMMAND_TIMEOUT_S)
        except CommandError as error:
            raise VolumeError(
                f"volume {volume_id}: could not {what} on this host: {error}",
                retryable=True,
                volume_id=volume_id,
                command=argv[0],
            ) from error
