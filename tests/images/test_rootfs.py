from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from hangar.errors import ImageError
from hangar.images.build import build_busybox_image, repack_with
from hangar.images.image_config import ImageConfig
from hangar.images.reference import parse_image_ref
from hangar.images.rootfs import MIB, CachedImage, ImageCache, machine_disk
from hangar.images.runner import Argv
from tests.images.conftest import HELLO_CMD, HELLO_ENV, PushedImage, suite_policy
from tests.images.ext4 import list_dir, read_file
from tests.images.recording import RecordingRunner


def _refuse(argv: Argv, **_: object) -> str:
    raise AssertionError(f"no command expected, ran {argv}")


def _leftovers(cache: Path) -> list[str]:
    """Names in the images cache that are neither complete entries nor lock files."""
    root = cache / "images"
    if not root.exists():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if not (
            entry.name.endswith(".lock") or (entry.is_dir() and entry.name.startswith("sha256-"))
        )
    )


def test_pulls_image_into_an_ext4_rootfs(
    cached_hello: CachedImage, pushed_hello: PushedImage
) -> None:
    assert cached_hello.digest == pushed_hello.digest
    assert cached_hello.image_ref == pushed_hello.ref.with_digest(pushed_hello.digest)
    assert cached_hello.config == ImageConfig(cmd=HELLO_CMD, env=HELLO_ENV)
    assert cached_hello.rootfs_path.stat().st_size >= 64 * MIB
    bin_dir = list_dir(cached_hello.rootfs_path, "/bin")
    assert oct(bin_dir["busybox"]) == "0o100755"
    assert {"sh", "echo", "nsenter"} <= set(bin_dir)
    assert read_file(cached_hello.rootfs_path, "/etc/passwd").startswith(b"root:x:0:0:")
    assert _leftovers(cached_hello.rootfs_path.parent.parent.parent) == []


def test_second_ensure_is_a_cache_hit(
    cached_hello: CachedImage, pushed_hello: PushedImage, session_cache_dir: Path, registry: str
) -> None:
    built_at = cached_hello.rootfs_path.stat().st_mtime_ns
    runner = RecordingRunner()
    cache = ImageCache(session_cache_dir, runner=runner, policy=suite_policy(registry))

    again = asyncio.run(cache.ensure(pushed_hello.ref))
    pinned = asyncio.run(cache.ensure(cached_hello.image_ref))

    assert again == pinned == cached_hello
    assert runner.programs() == []  # the tag is resolved over HTTP; nothing is rebuilt
    assert cached_hello.rootfs_path.stat().st_mtime_ns == built_at


def test_lookup_finds_cached_images_offline(
    cached_hello: CachedImage, session_cache_dir: Path
) -> None:
    cache = ImageCache(session_cache_dir, runner=_refuse)
    assert cache.lookup(cached_hello.digest) == cached_hello
    assert cache.lookup("sha256:" + "f" * 64) is None
    assert cache.lookup("../../etc") is None


def test_missing_image_raises_image_error(registry: str, tmp_path: Path) -> None:
    ref = parse_image_ref(f"{registry}/hangar/missing:latest")
    with pytest.raises(ImageError) as raised:
        asyncio.run(ImageCache(tmp_path, policy=suite_policy(registry)).ensure(ref))
    assert str(raised.value) == f"image {ref} not found"
    assert raised.value.fields["ref"] == str(ref)


def test_failed_pull_leaves_nothing_behind(registry: str, tmp_path: Path) -> None:
    ref = parse_image_ref(f"{registry}/hangar/hello@sha256:{'0' * 64}")
    with pytest.raises(ImageError) as raised:
        asyncio.run(ImageCache(tmp_path, policy=suite_policy(registry)).ensure(ref))
    assert raised.value.fields["reason"] == "not_found"
    assert _leftovers(tmp_path) == []
    assert not ImageCache(tmp_path).entry_for(ref.digest or "").exists()


def test_concurrent_ensures_build_once(
    pushed_hello: PushedImage, tmp_path: Path, registry: str
) -> None:
    runner = RecordingRunner()
    cache = ImageCache(tmp_path, runner=runner, policy=suite_policy(registry))

    async def twice() -> list[CachedImage]:
        ensures = (cache.ensure(pushed_hello.ref) for _ in range(2))
        return list(await asyncio.gather(*ensures))

    first, second = asyncio.run(twice())
    assert first == second
    assert runner.programs().count("umoci unpack") == 1
    assert runner.programs().count("mke2fs -q") == 1
    assert _leftovers(tmp_path) == []


def test_whiteouts_are_honoured(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_busybox_image(layout, "layered", ["sh"], {})

    def add_files(rootfs: Path) -> None:
        (rootfs / "etc" / "doomed").write_text("deleted by the next layer")
        (rootfs / "opt").mkdir()
        (rootfs / "opt" / "kept").write_text("kept")

    repack_with(layout, "layered", add_files)
    repack_with(layout, "layered", lambda rootfs: (rootfs / "etc" / "doomed").unlink())

    cache = ImageCache(tmp_path / "cache", rootless=True)
    cached = asyncio.run(cache.ensure(parse_image_ref(f"oci:{layout}:layered")))
    assert "doomed" not in list_dir(cached.rootfs_path, "/etc")
    assert {"passwd", "group"} <= set(list_dir(cached.rootfs_path, "/etc"))
    assert read_file(cached.rootfs_path, "/opt/kept") == b"kept"
    assert cached.image_ref.transport == "oci"


def test_machine_disk_is_a_sparse_writable_copy(cached_hello: CachedImage, tmp_path: Path) -> None:
    disk = machine_disk(cached_hello, tmp_path / "machines" / "m-1" / "root.ext4")
    assert disk.read_bytes() == cached_hello.rootfs_path.read_bytes()
    source, copy = cached_hello.rootfs_path.stat(), disk.stat()
    assert (copy.st_dev, copy.st_ino) != (source.st_dev, source.st_ino)
    assert copy.st_blocks * 512 < copy.st_size
    assert os.access(disk, os.W_OK)


def test_machine_disk_failure_leaves_no_file(cached_hello: CachedImage, tmp_path: Path) -> None:
    gone = cached_hello.model_copy(update={"rootfs_path": tmp_path / "gone.ext4"})
    with pytest.raises(ImageError) as raised:
        machine_disk(gone, tmp_path / "disk.ext4")
    assert raised.value.fields["action"] == "copy"
    assert not (tmp_path / "disk.ext4").exists()
