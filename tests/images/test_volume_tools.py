"""What init is told about volumes, and the volume tools archive appended to their initrd."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from hangar.images.busybox import HOST_BUSYBOX
from hangar.images.cpio import NewcArchive
from hangar.images.initramfs import guest_script, machine_initrd
from hangar.images.run_config import GuestRunConfig, GuestVolume
from hangar.images.volume_tools import (
    E2FSPROGS,
    VOLUMES_SCRIPT,
    ensure_volume_tools,
    shared_libraries,
)

A = "vol_aaaaaaaaaaaaaaaa"
B = "vol_bbbbbbbbbbbbbbbb"


def _config(**fields: object) -> GuestRunConfig:
    return GuestRunConfig.model_validate(
        {"machine_id": "m-1", "argv": ["true"], "hostname": "m-1", **fields}
    )


def test_init_reads_each_volume_from_run_env(tmp_path: Path) -> None:
    config = _config(
        volumes=[GuestVolume(serial=A, path="/data/"), GuestVolume(serial=B, path="/srv/db")]
    )
    run_env = tmp_path / "run.env"
    run_env.write_text(config.shell_env())
    script = (
        '. "$1"; printf "%s|" "$HANGAR_VOLUME_COUNT" "$HANGAR_VOLUME_0_SERIAL" '
        '"$HANGAR_VOLUME_0_PATH" "$HANGAR_VOLUME_1_PATH" "$HANGAR_VOLUME_1_FSTYPE"'
    )
    out = subprocess.run(
        [str(HOST_BUSYBOX), "sh", "-c", script, "sh", str(run_env)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.split("|")[:-1] == ["2", A, "/data", "/srv/db", "ext4"]
    assert "HANGAR_VOLUME_COUNT=0\n" in _config().shell_env()


@pytest.mark.parametrize(
    "volumes",
    [
        [{"serial": A, "path": "data"}],
        [{"serial": A, "path": "/"}],
        [{"serial": A, "path": "/a/../etc"}],
        [{"serial": A, "path": "/my data"}],
        [{"serial": "vol-bad", "path": "/data"}],
        [{"serial": A, "path": "/data", "fstype": "xfs"}],
        [{"serial": A, "path": "/a"}, {"serial": A, "path": "/b"}],
        [{"serial": A, "path": "/a"}, {"serial": B, "path": "/a/"}],
    ],
)
def test_rejects_volumes_init_cannot_mount(volumes: list[dict[str, str]]) -> None:
    with pytest.raises(ValidationError):
        _config(volumes=volumes)


def _list(archive: bytes) -> list[str]:
    listing = subprocess.run(
        ["cpio", "--quiet", "-t"], input=archive, check=True, capture_output=True
    )
    return listing.stdout.decode().split()


def test_the_tools_archive_holds_e2fsprogs_with_everything_it_loads(tmp_path: Path) -> None:
    archive_path = ensure_volume_tools(tmp_path)
    assert ensure_volume_tools(tmp_path) == archive_path  # built once
    archive = gzip.decompress(archive_path.read_bytes())
    names = _list(archive)
    assert {"sbin/mke2fs", "sbin/resize2fs", VOLUMES_SCRIPT} <= set(names)
    for binary in E2FSPROGS:
        for library in shared_libraries(binary):
            assert str(library).lstrip("/") in names
    # The tools run from the archive alone: unpack it and run mke2fs chrooted there.
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "--quiet", "-i", "-d"], input=archive, cwd=root, check=True)
    assert (root / VOLUMES_SCRIPT).read_bytes() == guest_script("volumes")
    image = root / "disk.img"
    image.write_bytes(b"\0" * (16 << 20))
    mke2fs = ["chroot", str(root), "/sbin/mke2fs", "-q", "-t", "ext4", "/disk.img"]
    subprocess.run(mke2fs, check=True)
    info = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    assert "has_journal" in fields["Filesystem features"]
    assert "extent" in fields["Filesystem features"]
    # (growing a mounted filesystem is shown in a real guest: tests/volumes/test_guest.py)
    usage = subprocess.run(["chroot", str(root), "/sbin/resize2fs"], capture_output=True, text=True)
    assert "resize2fs 1." in usage.stderr, usage.stderr


def test_machine_initrd_puts_extra_archives_between_base_and_machine(tmp_path: Path) -> None:
    parts = []
    for name in ("base", "tools"):
        archive = NewcArchive()
        archive.file(name, name.encode())
        path = tmp_path / f"{name}.cpio.gz"
        path.write_bytes(gzip.compress(archive.to_bytes()) + b"x")  # not 4-aligned
        parts.append(path)
    initrd = machine_initrd(parts[0], _config(), tmp_path / "initrd", [parts[1]])
    data = initrd.read_bytes()
    first = len(parts[0].read_bytes())
    second = data.index(parts[1].read_bytes())
    assert data.startswith(parts[0].read_bytes())
    assert second % 4 == 0 and second >= first
    machine_part = data[second + len(parts[1].read_bytes()) :].lstrip(b"\0")
    assert (len(data) - len(machine_part)) % 4 == 0
    assert "hangar/run.env" in _list(machine_part)
