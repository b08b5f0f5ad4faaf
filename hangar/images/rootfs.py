"""Image rootfs cache: one ext4 disk image per manifest digest, copied per machine.

Layout under ``CACHE/images``: ``sha256-HEX/`` holds ``rootfs.ext4`` and ``image.json``
(digest and image config). An entry folder exists only once complete (see ``cachedir``).
"""

from __future__ import annotations

import asyncio
import math
import os
import stat
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from hangar.errors import ImageError
from hangar.images import oci
from hangar.images.cachedir import build_once, scratch_dir
from hangar.images.image_config import ImageConfig
from hangar.images.reference import DIGEST_PATTERN, ImageRef
from hangar.images.runner import CommandError, CommandRunner, run_command

ROOTFS_NAME = "rootfs.ext4"
METADATA_NAME = "image.json"
MIB = 1024 * 1024
BLOCK = 4096
SIZE_FACTOR = 1.3
HEADROOM_BYTES = 64 * MIB
SPARE_INODES = 1024


class CachedImage(BaseModel):
    model_config = ConfigDict(frozen=True)

    digest: str
    image_ref: ImageRef
    config: ImageConfig
    rootfs_path: Path


class _Metadata(BaseModel):
    digest: str
    image_ref: ImageRef
    config: ImageConfig


def _blocks(size: int) -> int:
    return max(1, math.ceil(size / BLOCK)) * BLOCK


def measure_tree(root: Path) -> tuple[int, int]:
    """(bytes the tree takes in 4 KiB blocks, number of inodes) of a folder tree."""
    total = _blocks(0)
    inodes = 1
    for folder, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            info = os.lstat(os.path.join(folder, name))
            inodes += 1
            if stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode):
                total += _blocks(info.st_size)
            elif stat.S_ISDIR(info.st_mode):
                total += BLOCK
    return total, inodes


def make_ext4(source: Path, dest: Path, *, runner: CommandRunner = run_command) -> Path:
    """Build ``dest``, an ext4 image holding ``source``: content * 1.3 + 64 MiB, no mount."""
    content, inodes = measure_tree(source)
    size_mib = math.ceil((content * SIZE_FACTOR + HEADROOM_BYTES) / MIB)
    inode_count = math.ceil(inodes * SIZE_FACTOR) + SPARE_INODES
    runner(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-T", "default", "-m", "0", "-L", "hangar-root",
            "-N", str(inode_count), "-d", source, dest, f"{size_mib}M",
        ]
    )  # fmt: skip
    return dest


class ImageCacheObserver(Protocol):
    def image_lookup(self, hit: bool) -> None:
        """An image was asked for: ``hit`` if its rootfs was cached, else it was built."""
        ...


class CacheUsage(BaseModel):
    entries: int
    bytes: int
    """Disk space the entries take (allocated blocks: sparse files count what they hold)."""


def cache_usage(cache_dir: Path) -> CacheUsage:
    """How many images the rootfs cache under ``cache_dir`` holds, and their size on disk."""
    root = cache_dir / "images"
    entries, total = 0, 0
    try:
        folders = [entry for entry in root.iterdir() if entry.name.startswith("sha256-")]
    except FileNotFoundError:
        return CacheUsage(entries=0, bytes=0)
    for folder in folders:
        try:
            files = list(folder.iterdir())
        except OSError:
            continue
        entries += 1
        for item in files:
            try:
                total += item.lstat().st_blocks * 512
            except OSError:
                continue
    return CacheUsage(entries=entries, bytes=total)


class ImageCache:
    """Pull, unpack and turn images into cached ext4 rootfs images, once per digest.

    ``ensure`` is async (the blocking work runs in a worker thread); two concurrent
    ``ensure`` calls for one digest, in one process or several, build it once.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        runner: CommandRunner = run_command,
        rootless: bool | None = None,
        observer: ImageCacheObserver | None = None,
    ) -> None:
        """``observer`` is told whether each ``ensure`` found the image cached (metrics)."""
        self.root = cache_dir / "images"
        self._runner = runner
        self._rootless = rootless
        self._observer = observer

    def entry_for(self, digest: str) -> Path:
        if not DIGEST_PATTERN.fullmatch(digest):
            raise ImageError(f"bad image digest {digest!r}", digest=digest)
        return self.root / digest.replace(":", "-")

    async def ensure(self, ref: ImageRef, *, tls_verify: bool = True) -> CachedImage:
        return await asyncio.to_thread(self._ensure, ref, tls_verify)

    def _ensure(self, ref: ImageRef, tls_verify: bool) -> CachedImage:
        digest = oci.resolve_digest(ref, tls_verify=tls_verify, runner=self._runner)
        pinned = ref.with_digest(digest) if ref.transport == "docker" else ref
        built = False

        def build(staged: Path) -> None:
            nonlocal built
            built = True
            self._build(pinned, digest, staged, tls_verify)

        entry = build_once(self.entry_for(digest), build)
        if self._observer is not None:
            self._observer.image_lookup(hit=not built)
        return self._load(entry).model_copy(update={"image_ref": ref.with_digest(digest)})

    def lookup(self, digest: str) -> CachedImage | None:
        """The cached image with this digest, without any network access; ``None`` if absent.

        Its ``image_ref`` is the reference the entry was first built from."""
        if not DIGEST_PATTERN.fullmatch(digest):
            return None
        entry = self.entry_for(digest)
        return self._load(entry) if entry.is_dir() else None

    @staticmethod
    def _load(entry: Path) -> CachedImage:
        metadata = _Metadata.model_validate_json((entry / METADATA_NAME).read_bytes())
        return CachedImage(
            digest=metadata.digest,
            image_ref=metadata.image_ref,
            config=metadata.config,
            rootfs_path=entry / ROOTFS_NAME,
        )

    def _build(self, ref: ImageRef, digest: str, staged: Path, tls_verify: bool) -> None:
        with scratch_dir(self.root, "pull") as work:
            layout = work / "layout"
            oci.pull(ref, layout, tls_verify=tls_verify, runner=self._runner)
            config = oci.read_config(ref, layout)
            rootfs = oci.unpack(
                ref, layout, work / "bundle", rootless=self._rootless, runner=self._runner
            )
            try:
                make_ext4(rootfs, staged / ROOTFS_NAME, runner=self._runner)
            except CommandError as exc:
                raise ImageError(
                    f"failed to build the rootfs of image {ref}: {exc.stderr}",
                    ref=str(ref),
                    action="mkfs",
                    stderr=exc.stderr,
                ) from exc
        metadata = _Metadata(digest=digest, image_ref=ref.with_digest(digest), config=config)
        (staged / METADATA_NAME).write_text(metadata.model_dump_json())


def machine_disk(cached: CachedImage, dest: Path, *, runner: CommandRunner = run_command) -> Path:
    """A writable copy of the image's rootfs for one machine (sparse; reflinked where it can)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        runner(["cp", "--sparse=always", "--reflink=auto", cached.rootfs_path, dest])
    except CommandError as exc:
        dest.unlink(missing_ok=True)
        raise ImageError(
            f"failed to copy the rootfs of image {cached.image_ref} to {dest}: {exc.stderr}",
            ref=str(cached.image_ref),
            action="copy",
            stderr=exc.stderr,
        ) from exc
    return dest


def machine_tree(cached: CachedImage, dest: Path, *, runner: CommandRunner = run_command) -> Path:
    """A writable folder holding the image's rootfs for one sandbox-tier machine: the same
    cached ext4 image a VM boots from, dumped by ``debugfs`` (no mount). ``dest`` must not
    exist yet."""
    text = str(dest)
    if any(ch.isspace() or ch in "\"'\\" for ch in text):
        raise ImageError(f"cannot dump a rootfs into {text!r}: the path has blanks or quotes")
    dest.mkdir(parents=True)
    try:
        runner(["debugfs", "-R", f"rdump / {text}", cached.rootfs_path])
    except CommandError as exc:
        raise ImageError(
            f"failed to dump the rootfs of image {cached.image_ref} to {dest}: {exc.stderr}",
            ref=str(cached.image_ref),
            action="dump",
            stderr=exc.stderr,
        ) from exc
    lost = dest / "lost+found"
    if lost.is_dir() and not lost.is_symlink() and not any(lost.iterdir()):
        lost.rmdir()
    if not any(dest.iterdir()):
        raise ImageError(
            f"dumping the rootfs of image {cached.image_ref} left {dest} empty",
            ref=str(cached.image_ref),
            action="dump",
        )
    return dest
