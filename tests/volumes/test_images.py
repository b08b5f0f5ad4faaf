"""VolumeHost's operations on real qcow2 images with real qemu-img (no guest)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hangar.errors import Conflict, NotFound, Unprocessable, VolumeError
from hangar.volumes.host import VolumeHost, fork_snapshot_name
from hangar.volumes.model import (
    GIB,
    MAX_SNAPSHOTS_PER_VOLUME,
    ForkOf,
    FromSnapshot,
    VolumeSource,
    VolumeSpec,
    new_snapshot_id,
    new_volume_id,
)
from tests.volumes.helpers import MIB, holds_pattern, qemu_io, write_pattern


def spec(size_gb: int = 1, encrypted: bool = False) -> VolumeSpec:
    return VolumeSpec(id=new_volume_id(), size_gb=size_gb, encrypted=encrypted)


def create(
    host: VolumeHost, volume: VolumeSpec, source: VolumeSource | None = None, check: bool = True
) -> None:
    """Check then create, as the API and agent do; ``check=False`` skips the free-space check
    (a sparse volume bigger than this host's free space, a disk that fills later)."""
    if check:
        host.check_create(volume, source)
    asyncio.run(host.create_plan(volume, source).execute())


def test_a_volume_is_a_sparse_qcow2_image_that_costs_what_is_written(host: VolumeHost) -> None:
    volume = spec(size_gb=100)
    create(host, volume, check=False)

    image = host.layout.image(volume.id)
    info = host.info(volume.id)
    assert (info.virtual_size, info.encrypted) == (100 * GIB, False)
    assert image.stat().st_blocks * 512 < 2 * MIB
    write_pattern(host, volume.id, 0x5A, 0, 8 * MIB)
    assert 8 * MIB <= image.stat().st_blocks * 512 < 12 * MIB
    assert stat.S_IMODE(host.layout.images_dir.stat().st_mode) == 0o700
    assert not host.layout.partial_image(volume.id).exists()


def test_an_encrypted_volume_is_luks_under_its_own_wrapped_key(host: VolumeHost) -> None:
    first, second = spec(encrypted=True), spec(encrypted=True)
    create(host, first)
    create(host, second)

    assert host.info(first.id).encrypted
    plaintext = b"hangar secret volume content 7f3a\n" * 4096
    source = host.layout.root / "plain.txt"
    source.write_bytes(plaintext[: 128 * 1024])
    result = qemu_io(host, first.id, f"write -s {source} 0 128k")
    assert result.returncode == 0, result.stderr
    assert b"hangar secret volume content" not in host.layout.image(first.id).read_bytes()
    # Each volume has its own key: the second one's does not open the first.
    with host.keys.secret_file(second.id) as wrong_key:
        opts = f"driver=qcow2,file.filename={host.layout.image(first.id)},encrypt.key-secret=k"
        wrong = subprocess.run(
            [
                *("qemu-io", "--object", f"secret,id=k,file={wrong_key}"),
                *("--image-opts", "-c", "read 0 4k", opts),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    assert wrong.returncode != 0
    key_file = host.layout.key(first.id)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(host.keys.host_key_file.stat().st_mode) == 0o600
    assert list(host.layout.run_dir.iterdir()) == [], "secret files are removed after use"


def test_create_refuses_bad_sizes_and_a_taken_id_before_writing(host: VolumeHost) -> None:
    for size_gb in (0, 501):
        with pytest.raises(ValueError):
            VolumeSpec(id=new_volume_id(), size_gb=size_gb)
    volume = spec()
    create(host, volume)
    with pytest.raises(Conflict):
        host.check_create(volume)
    assert sorted(p.name for p in host.layout.images_dir.iterdir()) == [f"{volume.id}.qcow2"]


def test_sizes_beyond_free_space_less_the_reserve_get_a_422(tmp_path: Path) -> None:
    from hangar.volumes.settings import VolumeSettings

    free = 10 * GIB
    host = VolumeHost(
        VolumeSettings(root=tmp_path / "v", reserve_bytes=3 * GIB), free_bytes=lambda _: free
    )
    host.check_create(spec(size_gb=7))
    with pytest.raises(Unprocessable) as refused:
        host.check_create(spec(size_gb=8))
    assert refused.value.fields["field"] == "size_gb"
    assert refused.value.http_status == 422
    assert list((tmp_path / "v" / "images").iterdir()) == []


def test_extend_offline_grows_the_image_keeps_data_and_refuses_shrinking(
    host: VolumeHost,
) -> None:
    volume = spec(encrypted=True)
    create(host, volume)
    write_pattern(host, volume.id, 0x11, 0, MIB)

    host.check_extend(volume.id, 3)
    asyncio.run(host.extend_plan(volume.id, 3).execute())

    assert host.info(volume.id).virtual_size == 3 * GIB
    assert holds_pattern(host, volume.id, 0x11, 0, MIB)
    for size_gb in (1, 3):
        with pytest.raises(Unprocessable) as refused:
            host.check_extend(volume.id, size_gb)
        assert refused.value.fields["field"] == "size_gb"


def test_snapshot_then_restore_into_a_new_volume_gives_the_old_content(
    host: VolumeHost,
) -> None:
    volume = spec(encrypted=True)
    create(host, volume)
    write_pattern(host, volume.id, 0xA1, 0, MIB)
    snapshot_id = new_snapshot_id()
    asyncio.run(host.snapshot_plan(volume.id, snapshot_id).execute())
    write_pattern(host, volume.id, 0xB2, 0, MIB)

    restored = spec(size_gb=2, encrypted=False)
    create(host, restored, FromSnapshot(volume_id=volume.id, snapshot_id=snapshot_id))

    assert [s.id for s in host.snapshots(volume.id)] == [snapshot_id]
    assert holds_pattern(host, restored.id, 0xA1, 0, MIB)
    assert holds_pattern(host, volume.id, 0xB2, 0, MIB)
    assert host.info(restored.id).virtual_size == 2 * GIB
    assert host.info(restored.id).snapshots == []


def test_a_fork_is_independent_of_its_source_which_can_then_be_deleted(
    host: VolumeHost,
) -> None:
    source = spec()
    create(host, source)
    write_pattern(host, source.id, 0xC3, 4 * MIB, MIB)

    fork = spec(encrypted=True)
    create(host, fork, ForkOf(volume_id=source.id))
    assert host.info(source.id).snapshot(fork_snapshot_name(fork.id)) is None
    asyncio.run(host.delete_plan(source.id).execute())

    assert not host.exists(source.id)
    assert host.info(fork.id).encrypted
    assert holds_pattern(host, fork.id, 0xC3, 4 * MIB, MIB)


def test_create_from_a_missing_snapshot_or_too_small_is_refused(host: VolumeHost) -> None:
    volume = spec(size_gb=2)
    create(host, volume)
    with pytest.raises(NotFound):
        host.check_create(spec(), FromSnapshot(volume_id=volume.id, snapshot_id=new_snapshot_id()))
    with pytest.raises(Unprocessable):
        host.check_create(spec(size_gb=1), ForkOf(volume_id=volume.id))
    with pytest.raises(NotFound):
        host.check_create(spec(), ForkOf(volume_id=new_volume_id()))


def test_snapshots_are_bounded_per_volume(host: VolumeHost) -> None:
    volume = spec()
    create(host, volume)
    ids = [new_snapshot_id() for _ in range(MAX_SNAPSHOTS_PER_VOLUME)]

    async def take_all() -> None:
        for snapshot_id in ids:
            await host.snapshot_plan(volume.id, snapshot_id).execute()

    asyncio.run(take_all())
    with pytest.raises(Unprocessable):
        host.check_snapshot(volume.id)
    asyncio.run(host.delete_snapshot_plan(volume.id, ids[0]).execute())
    host.check_snapshot(volume.id)
    assert [s.id for s in host.snapshots(volume.id)] == ids[1:]


def test_delete_removes_key_and_image(host: VolumeHost) -> None:
    volume = spec(encrypted=True)
    create(host, volume)
    asyncio.run(host.delete_plan(volume.id).execute())
    assert not host.layout.image(volume.id).exists()
    assert not host.layout.key(volume.id).exists()
    asyncio.run(host.delete_plan(volume.id).execute())  # deleting again is a no-op


def test_a_full_host_disk_fails_the_create_with_a_retryable_error_and_frees_it(
    small_disk_host: VolumeHost, small_disk: Path
) -> None:
    host = small_disk_host
    other = spec(encrypted=True)
    create(host, other, check=False)
    write_pattern(host, other.id, 0x77, 0, MIB)
    ballast = small_disk / "ballast"
    with ballast.open("wb") as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"x" * MIB)
    free = shutil.disk_usage(small_disk).free
    ballast.write_bytes(b"x" * (ballast.stat().st_size - 256 * 1024))  # keys fit, images do not
    assert shutil.disk_usage(small_disk).free > free

    volume = spec(encrypted=True)
    with pytest.raises(VolumeError) as failed:
        asyncio.run(host.create_plan(volume).execute())

    assert failed.value.retryable
    assert failed.value.fields["reason"] == "host_disk_full"
    assert "disk is full" in failed.value.message
    assert not host.layout.key(volume.id).exists()
    assert not host.layout.image(volume.id).exists()
    assert not host.layout.partial_image(volume.id).exists()
    assert holds_pattern(host, other.id, 0x77, 0, MIB)
    assert host.check_image(other.id).get("corruptions", 0) == 0
