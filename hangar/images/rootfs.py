"""Image rootfs cache: one ext4 disk image per manifest digest; machines boot from qcow2
overlays over it (:mod:`hangar.images.overlay`).

Layout under ``CACHE/images``: ``sha256-HEX/`` holds ``rootfs.ext4`` and ``image.json``
(digest and image config; its modification time is when the image was last used). An entry
folder exists only once complete (see ``cachedir``).

Bounds: pulls and builds run on the fair :class:`~hangar.images.workers.ImageWorkers` pool,
each command and each pull with a timeout; an image larger than the operator allows
(compressed or unpacked) is refused before it is unpacked; and past ``cache_bytes`` the least
recently used images no machine's root disk uses are evicted.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from hangar.errors import ImageError
from hangar.images import oci
from hangar.images.cachedir import build_once, entry_lock, remove_tree, scratch_dir
from hangar.images.image_config import ImageConfig
from hangar.images.layout import (
    BlobSink,
    check_unpacked_size,
    finish_layout,
    start_layout,
    too_large,
)
from hangar.images.local_layout import LocalLayouts
from hangar.images.netpolicy import RegistryPolicy
from hangar.images.overlay import create_overlay
from hangar.images.reference import DIGEST_PATTERN, ImageRef
from hangar.images.registry import (
    PullLimits,
    RegistrySession,
    ResolvedImage,
    check_compressed,
    resolve,
    run_pull,
)
from hangar.images.runner import Cancellation, CommandError, CommandRunner, run_command
from hangar.images.workers import ImageWorkers

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


def make_ext4(
    source: Path,
    dest: Path,
    *,
    runner: CommandRunner = run_command,
    timeout_s: float | None = None,
    measured: tuple[int, int] | None = None,
) -> Path:
    """Build ``dest``, an ext4 image holding ``source``: content * 1.3 + 64 MiB, no mount."""
    content, inodes = measured if measured is not None else measure_tree(source)
    size_mib = math.ceil((content * SIZE_FACTOR + HEADROOM_BYTES) / MIB)
    inode_count = math.ceil(inodes * SIZE_FACTOR) + SPARE_INODES
    runner(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-T", "default", "-m", "0", "-L", "hangar-root",
            "-N", str(inode_count), "-d", source, dest, f"{size_mib}M",
        ],
        timeout=timeout_s,
    )  # fmt: skip
    return dest


MIB_BYTES = 1024 * 1024
GIB = 1024 * MIB_BYTES


@dataclass(frozen=True)
class ImageLimits:
    """The operator's bounds on image work (``HANGAR_IMAGE_*``)."""

    max_compressed_bytes: int = 4096 * MIB_BYTES
    max_unpacked_bytes: int = 16384 * MIB_BYTES
    pull_timeout_s: float = 600.0
    command_timeout_s: float = 600.0
    cache_bytes: int = 20 * GIB
    keep_recent_s: float = 600.0
    """An image used this recently is not evicted (a machine between resolve and boot)."""


InUse = Callable[[], set[str]]
"""The digests machines' root disks use now (never evicted)."""


def _entry_bytes(entry: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for path in entry.iterdir():
            with contextlib.suppress(OSError):
                total += path.lstat().st_blocks * 512
    return total


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
        if folder.is_dir():
            entries += 1
            total += _entry_bytes(folder)
    return CacheUsage(entries=entries, bytes=total)


class ImageCache:
    """Pull, unpack and turn images into cached ext4 rootfs images, once per digest.

    ``ensure`` is async (the blocking work runs on the image pool); two concurrent
    ``ensure`` calls for one digest, in one process or several, build it once.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        runner: CommandRunner = run_command,
        rootless: bool | None = None,
        policy: RegistryPolicy | None = None,
        layouts: LocalLayouts | None = None,
        limits: ImageLimits | None = None,
        workers: ImageWorkers | None = None,
        in_use: InUse | None = None,
        observer: ImageCacheObserver | None = None,
    ) -> None:
        """``policy``: which registries may be pulled from (default: none on this host);
        ``layouts``: where ``oci:`` layouts may be (default: anywhere, for tools and tests;
        the server passes ``HANGAR_OCI_DIRS``); ``observer`` is told whether each ``ensure``
        found the image cached (metrics)."""
        self.root = cache_dir / "images"
        self._runner = runner
        self._rootless = rootless
        self.policy = policy or RegistryPolicy()
        self.layouts = layouts or LocalLayouts([Path("/")])
        self.limits = limits or ImageLimits()
        self.workers = workers or ImageWorkers()
        self._in_use = in_use
        self._observer = observer

    def entry_for(self, digest: str) -> Path:
        if not DIGEST_PATTERN.fullmatch(digest):
            raise ImageError(f"bad image digest {digest!r}", digest=digest)
        return self.root / digest.replace(":", "-")

    async def ensure(
        self, ref: ImageRef, *, tls_verify: bool = True, owner: str = ""
    ) -> CachedImage:
        """The image ``ref`` names, cached; pulled on ``owner``'s share of the image pool.
        ``tls_verify=False``: speak plain HTTP to its registry (an insecure registry)."""
        if ref.transport == "docker" and ref.digest:
            hit = self.lookup(ref.digest)
            if hit is not None:
                self.touch(ref.digest)
                self._observed(hit=True)
                return hit.model_copy(update={"image_ref": ref})
        return await self.workers.run(
            owner, lambda cancellation: self._ensure(ref, not tls_verify, cancellation)
        )

    def _pull_limits(self) -> PullLimits:
        return PullLimits(self.limits.max_compressed_bytes, self.limits.pull_timeout_s)

    def _observed(self, hit: bool) -> None:
        if self._observer is not None:
            self._observer.image_lookup(hit=hit)

    def _ensure(self, ref: ImageRef, insecure: bool, cancellation: Cancellation) -> CachedImage:
        built = False

        def counted(build: Callable[[Path], None]) -> Callable[[Path], None]:
            def run(staged: Path) -> None:
                nonlocal built
                built = True
                build(staged)

            return run

        if ref.transport == "oci":
            with self.layouts.open(ref) as local:
                resolved = local.resolve()

                def copy_local(layout: Path) -> None:
                    for blob in resolved.manifest.blobs:
                        local.copy_blob(blob, BlobSink(layout, blob, cancellation))

                entry = build_once(
                    self.entry_for(resolved.digest),
                    counted(
                        lambda staged: self._build(ref, resolved, staged, copy_local, cancellation)
                    ),
                )
        else:
            limits = self._pull_limits()
            resolved = run_pull(resolve, ref, self.policy, limits, cancellation, insecure)
            pinned = ref.with_digest(resolved.digest)

            def fetch(layout: Path) -> None:
                async def blobs(session: RegistrySession) -> None:
                    for blob in resolved.manifest.blobs:
                        await session.blob(blob, BlobSink(layout, blob, cancellation))

                run_pull(blobs, pinned, self.policy, limits, cancellation, insecure)

            entry = build_once(
                self.entry_for(resolved.digest),
                counted(lambda staged: self._build(pinned, resolved, staged, fetch, cancellation)),
            )
        self._observed(hit=not built)
        self.touch(resolved.digest)
        loaded = self._load(entry)
        self.evict(keep={resolved.digest})
        return loaded.model_copy(update={"image_ref": ref.with_digest(resolved.digest)})

    def lookup(self, digest: str) -> CachedImage | None:
        """The cached image with this digest, without any network access; ``None`` if absent.

        Its ``image_ref`` is the reference the entry was first built from."""
        if not DIGEST_PATTERN.fullmatch(digest):
            return None
        entry = self.entry_for(digest)
        try:
            return self._load(entry) if entry.is_dir() else None
        except FileNotFoundError:  # evicted meanwhile
            return None

    def touch(self, digest: str) -> None:
        """Mark the image used now (eviction goes least recently used first)."""
        with contextlib.suppress(OSError, ImageError):
            os.utime(self.entry_for(digest) / METADATA_NAME)

    @staticmethod
    def _load(entry: Path) -> CachedImage:
        metadata = _Metadata.model_validate_json((entry / METADATA_NAME).read_bytes())
        return CachedImage(
            digest=metadata.digest,
            image_ref=metadata.image_ref,
            config=metadata.config,
            rootfs_path=entry / ROOTFS_NAME,
        )

    def _build(
        self,
        ref: ImageRef,
        resolved: ResolvedImage,
        staged: Path,
        copy: Callable[[Path], None],
        cancellation: Cancellation,
    ) -> None:
        limits = self.limits
        check_compressed(resolved.manifest, limits.max_compressed_bytes)
        with scratch_dir(self.root, "pull") as work:
            layout = work / "layout"
            start_layout(layout)
            copy(layout)
            finish_layout(layout, resolved.manifest)
            check_unpacked_size(layout, resolved.manifest, limits.max_unpacked_bytes, cancellation)
            config = oci.read_config(ref, layout)
            rootfs = oci.unpack(
                ref,
                layout,
                work / "bundle",
                rootless=self._rootless,
                runner=self._runner,
                timeout_s=limits.command_timeout_s,
            )
            measured = measure_tree(rootfs)
            if measured[0] > limits.max_unpacked_bytes:
                raise too_large("unpacked", limits.max_unpacked_bytes)
            try:
                make_ext4(
                    rootfs,
                    staged / ROOTFS_NAME,
                    runner=self._runner,
                    timeout_s=limits.command_timeout_s,
                    measured=measured,
                )
            except CommandError as exc:
                raise ImageError(
                    f"failed to build the rootfs of image {ref}",
                    ref=str(ref),
                    action="mkfs",
                    stderr=exc.stderr,
                ) from exc
        metadata = _Metadata(
            digest=resolved.digest, image_ref=ref.with_digest(resolved.digest), config=config
        )
        (staged / METADATA_NAME).write_text(metadata.model_dump_json())

    # machines' root disks
    def overlay(self, cached: CachedImage, dest: Path) -> Path:
        """A qcow2 root disk over ``cached`` at ``dest`` (made under the entry's lock, so it
        cannot be evicted in between)."""
        entry = self.entry_for(cached.digest)
        with entry_lock(entry):
            if not (entry / ROOTFS_NAME).exists():
                raise ImageError(f"image {cached.digest} is not in the cache", digest=cached.digest)
            self.touch(cached.digest)
            return create_overlay(
                entry / ROOTFS_NAME,
                dest,
                runner=self._runner,
                timeout_s=self.limits.command_timeout_s,
            )

    # eviction
    def entries(self) -> list[tuple[str, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            digest = entry.name.replace("-", ":", 1)
            if entry.is_dir() and DIGEST_PATTERN.fullmatch(digest):
                found.append((digest, entry))
        return found

    def size_bytes(self) -> int:
        return sum(_entry_bytes(entry) for _digest, entry in self.entries())

    def evict(self, now: float | None = None, keep: set[str] | None = None) -> list[str]:
        """Past ``cache_bytes``: remove the least recently used images that no machine's
        root disk uses, nobody used in the last ``keep_recent_s`` and that are not in
        ``keep``. Returns their digests."""
        now = time.time() if now is None else now
        sized = []
        for digest, entry in self.entries():
            try:
                used = (entry / METADATA_NAME).stat().st_mtime
                sized.append((used, digest, entry, _entry_bytes(entry)))
            except OSError:
                continue
        total = sum(size for *_rest, size in sized)
        if total <= self.limits.cache_bytes:
            return []
        evicted = []
        for used, digest, entry, size in sorted(sized):
            if total <= self.limits.cache_bytes:
                break
            if now - used < self.limits.keep_recent_s or digest in (keep or set()):
                continue
            with entry_lock(entry):
                in_use = self._in_use() if self._in_use is not None else set()
                if digest in in_use or not entry.is_dir():
                    continue
                trash = entry.with_name(f".evicted-{entry.name}-{secrets.token_hex(4)}")
                entry.rename(trash)
            remove_tree(trash)
            total -= size
            evicted.append(digest)
        return evicted


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
