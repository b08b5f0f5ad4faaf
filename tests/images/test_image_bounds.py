"""What an image may cost the host: size limits (compressed and unpacked) checked before
anything is unpacked, a cache with a budget that evicts the least recently used images no
machine uses, root disks that cost what they write, and ``oci:`` layouts checked at every
resolve, pinned by digest and refused with one answer whatever is at the path."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from hangar.errors import ImageError
from hangar.images.build import build_busybox_image, repack_with
from hangar.images.local_layout import LocalLayouts
from hangar.images.overlay import overlay_backing
from hangar.images.reference import parse_image_ref
from hangar.images.rootfs import MIB, ImageCache, ImageLimits
from tests.images.recording import RecordingRunner

BOMB_BYTES = 256 * MIB


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small``, ``other`` (two small images) and ``bomb`` (a few KB compressed, 256 MiB of
    zeros unpacked) in one layout."""
    layout = tmp_path_factory.mktemp("bounds") / "layout"
    for tag in ("small", "other", "bomb"):
        build_busybox_image(layout, tag, ["sh", "-c", f"echo {tag}"], {})

    def zeros(rootfs: Path) -> None:
        with (rootfs / "zeros").open("wb") as sink:
            sink.truncate(BOMB_BYTES)

    repack_with(layout, "bomb", zeros)
    return layout


def ensure(cache: ImageCache, layout: Path, tag: str) -> object:
    return asyncio.run(cache.ensure(parse_image_ref(f"oci:{layout}:{tag}")))


def test_an_image_past_the_unpacked_limit_is_refused_before_it_is_unpacked(
    layouts: Path, tmp_path: Path
) -> None:
    runner = RecordingRunner()
    limits = ImageLimits(max_unpacked_bytes=64 * MIB)
    cache = ImageCache(tmp_path, runner=runner, limits=limits)
    with pytest.raises(ImageError) as raised:
        ensure(cache, layouts, "bomb")
    assert raised.value.fields["reason"] == "too_large"
    assert "64 MiB unpacked" in str(raised.value)
    assert runner.programs() == [], "nothing was unpacked"
    assert cache.entries() == []
    assert ensure(cache, layouts, "small") is not None


def test_an_image_past_the_compressed_limit_is_refused_before_it_is_copied(
    layouts: Path, tmp_path: Path
) -> None:
    cache = ImageCache(tmp_path, limits=ImageLimits(max_compressed_bytes=64 * 1024))
    with pytest.raises(ImageError) as raised:
        ensure(cache, layouts, "small")
    assert raised.value.fields["reason"] == "too_large"
    assert cache.entries() == []


def test_root_disks_cost_what_they_write(layouts: Path, tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache")
    cached = asyncio.run(cache.ensure(parse_image_ref(f"oci:{layouts}:small")))
    disk = cache.overlay(cached, tmp_path / "machines" / "m1" / "root.qcow2")
    assert overlay_backing(disk) == cached.rootfs_path.resolve()
    assert disk.stat().st_blocks * 512 < 1 * MIB
    assert cached.rootfs_path.stat().st_size > 64 * MIB


def test_the_cache_evicts_least_recently_used_images_no_machine_uses(
    layouts: Path, tmp_path: Path
) -> None:
    in_use: set[str] = set()
    cache = ImageCache(tmp_path, limits=ImageLimits(keep_recent_s=0), in_use=lambda: set(in_use))
    small = asyncio.run(cache.ensure(parse_image_ref(f"oci:{layouts}:small")))
    # A budget with room for one image and a half.
    cache.limits = dataclasses.replace(cache.limits, cache_bytes=cache.size_bytes() * 3 // 2)
    # ``small`` is a machine's root disk's base: the next build must evict around it.
    in_use.add(small.digest)
    os.utime(cache.entry_for(small.digest) / "image.json", (1, 1))
    other = asyncio.run(cache.ensure(parse_image_ref(f"oci:{layouts}:other")))
    assert {digest for digest, _ in cache.entries()} == {small.digest, other.digest}
    in_use.clear()
    assert cache.evict() == [small.digest], "the least recently used, now unused, goes"
    assert cache.lookup(small.digest) is None and cache.lookup(other.digest) is not None


def test_oci_layouts_are_checked_at_every_resolve_on_the_real_path(
    layouts: Path, tmp_path: Path
) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    shutil.copytree(layouts, outside / "layout")
    shutil.copytree(layouts, allowed / "layout")
    link = allowed / "image"
    link.symlink_to(allowed / "layout")
    cache = ImageCache(tmp_path / "cache", layouts=LocalLayouts([allowed]))
    assert ensure(cache, link, "small") is not None
    # After "create", the link is pointed out of the allowed folder: the next resolve refuses.
    link.unlink()
    link.symlink_to(outside / "layout")
    with pytest.raises(ImageError) as raised:
        ensure(cache, link, "other")
    assert raised.value.fields["reason"] == "layout_unusable"


def test_a_layout_swapped_after_resolve_cannot_poison_the_cache(
    layouts: Path, tmp_path: Path
) -> None:
    source = tmp_path / "allowed" / "layout"
    shutil.copytree(layouts, source)
    ref = parse_image_ref(f"oci:{source}:small")
    layouts_here = LocalLayouts([tmp_path / "allowed"])
    with layouts_here.open(ref) as local:
        resolved = local.resolve()
        # Swap: the whole layout renamed away and a different one put at the path...
        source.rename(tmp_path / "allowed" / "moved")
        shutil.copytree(layouts, source)
        layer = resolved.manifest.layers[0]
        blob = source / "blobs" / layer.digest.replace(":", "/")
        blob.chmod(0o644)
        blob.write_bytes(b"poison")
        # ...is not what is read: the layout opened at resolve is.
        from hangar.images.layout import BlobSink, start_layout

        work = tmp_path / "work"
        start_layout(work)
        local.copy_blob(layer, BlobSink(work, layer, None))
        assert (work / "blobs" / layer.digest.replace(":", "/")).read_bytes() != b"poison"
    # And a blob changed in place does not match its digest: refused, nothing cached.
    cache = ImageCache(tmp_path / "cache", layouts=layouts_here)
    with pytest.raises(ImageError):
        ensure(cache, source, "small")
    assert cache.entries() == []


def test_oci_errors_say_the_same_for_missing_and_not_a_layout(tmp_path: Path) -> None:
    cache = ImageCache(tmp_path / "cache", layouts=LocalLayouts([tmp_path]))
    (tmp_path / "plain-file").write_text("hello")
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "bad-index").mkdir()
    (tmp_path / "bad-index" / "index.json").write_text("{not json")
    answers = set()
    for name in ("missing", "plain-file", "empty-dir", "bad-index"):
        with pytest.raises(ImageError) as raised:
            ensure(cache, tmp_path / name, "latest")
        answers.add(str(raised.value).replace(str(tmp_path / name), "PATH"))
    assert len(answers) == 1, answers
