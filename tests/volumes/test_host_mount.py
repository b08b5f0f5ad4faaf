"""Volumes mounted on the host for sandbox-tier machines (``hangar.volumes.host_mount``), with
real parts: qemu-storage-daemon's FUSE export, a loop device, ext4, QMP:

- a plain and an encrypted volume are formatted on first use, written, unmounted and mounted
  again with their data; the encrypted image holds none of the plaintext;
- while mounted, the daemon answers for the image: an extend (QMP ``block_resize``) grows the
  image, and the filesystem at once where ext4 may be grown online (``CAP_SYS_RESOURCE``,
  which the test machines withhold) or else at the next mount; a snapshot is taken online;
- every part of a mount is idempotent and ``unmount`` undoes any subset of them: a mount
  whose daemon was killed, one cut short before its loop device, a second mount call;
- a disk holding something other than ext4 is refused and never formatted;
- nothing is left afterwards: no daemon, no loop device, no mount, no state folder.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar.errors import VolumeError
from hangar.volumes.host import VolumeHost
from hangar.volumes.host_mount import CAP_SYS_RESOURCE, HostMounts, MountPaths, has_capability
from hangar.volumes.model import GIB, VolumeSpec, new_snapshot_id, new_volume_id
from tests.volumes.helpers import MIB, holds_pattern, new_host, write_pattern

MARKER = "host-mounted-marker-61c2e0"


@pytest.fixture
def mounted_host(tmp_path: Path) -> Iterator[VolumeHost]:
    if os.geteuid() != 0 or shutil.which("qemu-storage-daemon") is None:
        pytest.skip("host mounts need root and qemu-storage-daemon")
    if not Path("/dev/fuse").exists() or not Path("/dev/loop-control").exists():
        pytest.skip("host mounts need /dev/fuse and loop devices")
    volumes = tmp_path / "volumes"
    host = new_host(volumes)
    host.mounts = HostMounts(tmp_path / "mounts")
    try:
        yield host
    finally:
        for volume_id in host.mounts.owners():
            host.mounts.unmount(volume_id)


def create(host: VolumeHost, encrypted: bool, size_gb: int = 1) -> str:
    spec = VolumeSpec(id=new_volume_id(), size_gb=size_gb, encrypted=encrypted)
    asyncio.run(host.create_plan(spec).execute())
    return spec.id


def mount(host: VolumeHost, volume_id: str, machine_id: str = "m1") -> Path:
    disk = host.attachment(volume_id, machine_id)
    try:
        return host.mounts.mount(disk, machine_id)
    finally:
        if disk.key_file is not None:
            disk.key_file.unlink(missing_ok=True)


def loop_devices_over(paths: MountPaths) -> list[str]:
    out = subprocess.run(
        ["losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [line.split()[0] for line in out.splitlines() if str(paths.export) in line]


def mount_table_mentions(folder: Path) -> bool:
    return str(folder) in Path("/proc/self/mounts").read_text()


def assert_nothing_left(host: VolumeHost, volume_id: str) -> None:
    paths = host.mounts.paths(volume_id)
    assert host.mounts.daemon_pid(volume_id) is None
    assert loop_devices_over(paths) == []
    assert not mount_table_mentions(paths.folder)
    assert not paths.folder.exists()
    assert host.mounts.owners() == {}


def fs_kib(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_blocks * stat.f_frsize // 1024


def test_volumes_mount_on_the_host_keep_their_data_grow_and_snapshot(
    mounted_host: VolumeHost,
) -> None:
    host = mounted_host
    plain, secret = create(host, encrypted=False), create(host, encrypted=True)
    for volume_id in (plain, secret):
        folder = mount(host, volume_id)
        assert host.mounts.mounted(volume_id, "m1") and not host.mounts.mounted(volume_id, "m2")
        assert host.mounts.owned_by("m1") == sorted(
            v for v in (plain, secret) if host.mounts.mounted(v)
        )
        (folder / "note").write_text(MARKER * 64)
        assert mount(host, volume_id) == folder, "a second mount keeps the first"
    # Another machine cannot take a volume mounted for m1.
    with pytest.raises(VolumeError, match="mounted on this host for machine m1"):
        mount(host, plain, "m2")

    # Online: the daemon answers for the image; an extend grows the mounted filesystem.
    qmp = host.mounts.qmp_socket(plain)
    assert qmp is not None and qmp.is_socket()
    before = fs_kib(host.mounts.paths(plain).fs)
    asyncio.run(host.extend_plan(plain, 2, qmp_socket=qmp).execute())
    assert host.info(plain).virtual_size == 2 * GIB
    if has_capability(CAP_SYS_RESOURCE):  # the filesystem grows while mounted
        assert fs_kib(host.mounts.paths(plain).fs) > before * 3 // 2
    else:  # ext4 refuses an online resize without it: it grows at the next mount
        assert fs_kib(host.mounts.paths(plain).fs) == before
    snapshot = new_snapshot_id()
    asyncio.run(host.snapshot_plan(plain, snapshot, qmp_socket=qmp).execute())
    (host.mounts.paths(plain).fs / "later").write_text("after the snapshot")
    assert [s.id for s in host.snapshots(plain)] == [snapshot]

    for volume_id in (plain, secret):
        host.mounts.unmount(volume_id)
    assert_nothing_left(host, plain)
    assert_nothing_left(host, secret)
    assert MARKER.encode() not in host.layout.image(secret).read_bytes()

    # Mounted again (for another machine now): the data is there, at the new size.
    folder = mount(host, plain, "m2")
    assert (folder / "note").read_text() == MARKER * 64
    assert (folder / "later").read_text() == "after the snapshot"
    assert fs_kib(folder) > before * 3 // 2, "grown to the disk's new size"
    host.mounts.unmount(plain)
    assert (mount(host, secret, "m2") / "note").read_text() == MARKER * 64
    host.mounts.unmount(secret)
    assert_nothing_left(host, plain)
    assert_nothing_left(host, secret)


def test_unmount_undoes_any_part_and_a_remount_recovers(mounted_host: VolumeHost) -> None:
    host = mounted_host
    volume_id = create(host, encrypted=True)
    folder = mount(host, volume_id)
    (folder / "kept").write_text("kept")
    subprocess.run(["sync"], check=True)
    paths = host.mounts.paths(volume_id)

    # A mount cut short after its loop device (as if the agent died there): done on retry.
    subprocess.run(["umount", str(paths.fs)], check=True)
    assert not host.mounts.mounted(volume_id)
    assert mount(host, volume_id) == folder and (folder / "kept").read_text() == "kept"

    # A daemon killed under the mount: unmount still undoes every part.
    pid = host.mounts.daemon_pid(volume_id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    subprocess.run(["umount", "-l", str(paths.fs)], check=False)
    host.mounts.unmount(volume_id)
    assert_nothing_left(host, volume_id)
    host.mounts.unmount(volume_id)  # idempotent

    # The image survived the kill: it mounts again with what was synced.
    assert (mount(host, volume_id) / "kept").read_text() == "kept"
    host.mounts.unmount(volume_id)
    assert_nothing_left(host, volume_id)


def test_a_disk_holding_something_else_is_never_formatted(mounted_host: VolumeHost) -> None:
    host = mounted_host
    volume_id = create(host, encrypted=False)
    write_pattern(host, volume_id, 0x5A, 0, MIB)
    with pytest.raises(VolumeError, match="other than an ext4 filesystem"):
        mount(host, volume_id)
    host.mounts.unmount(volume_id)
    assert_nothing_left(host, volume_id)
    # Untouched: the pattern is still there, no filesystem was written over it.
    assert holds_pattern(host, volume_id, 0x5A, 0, MIB)
