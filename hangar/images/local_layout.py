"""``oci:`` images: OCI layouts on this host, read only under the directories the operator
allows (``HANGAR_OCI_DIRS``).

The check is made at every resolve, not once at create, and on the real path (a link made
after create cannot lead elsewhere). The layout is opened once, component by component
without following links, and everything is then read through that open directory and
verified against its digest: swapping the layout (or a blob) between the resolve and the
copy cannot put anything but the resolved image into the shared cache. Every failure gets
the same answer, so that a tenant learns nothing of what exists at a path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hangar.errors import ImageError
from hangar.images.layout import (
    CHUNK,
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    REF_NAME,
    BlobSink,
    Descriptor,
    ImageManifest,
    digest_of,
    media_type_of,
    open_beneath,
    parse_json,
    read_capped,
    select_platform,
)
from hangar.images.reference import ImageRef
from hangar.images.registry import ResolvedImage
from hangar.images.runner import Cancelled


def layout_unusable(ref: ImageRef) -> ImageError:
    """The one answer for an ``oci:`` layout that is missing, not a layout, unreadable, or
    outside the allowed directories."""
    return ImageError(
        f"oci: layout {ref.repository}:{ref.tag} cannot be used: it is missing, not an OCI "
        "image layout, or not under a directory the operator allows (HANGAR_OCI_DIRS)",
        ref=str(ref),
        reason="layout_unusable",
    )


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _open_directory(path: Path) -> int:
    """Open the absolute ``path`` walking from ``/`` without following any link."""
    descriptor = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in path.parts[1:]:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = child
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


class LocalLayout:
    """One resolve of an ``oci:`` reference: the layout's directory, held open."""

    def __init__(self, ref: ImageRef, directory: int) -> None:
        self.ref = ref
        self._directory = directory

    def _read(self, relative: str, limit: int) -> bytes:
        with open_beneath(self._directory, relative) as stream:
            return read_capped(stream, limit, relative)

    def _blob(self, digest: str) -> bytes:
        raw = self._read("blobs/" + digest.replace(":", "/"), MAX_MANIFEST_BYTES)
        if digest_of(raw) != digest:
            raise layout_unusable(self.ref)
        return raw

    def resolve(self) -> ResolvedImage:
        try:
            index = parse_json(self._read("index.json", MAX_MANIFEST_BYTES), "index")
            entries = index.get("manifests")
            if not isinstance(entries, list):
                raise layout_unusable(self.ref)
            tagged = next(
                entry
                for entry in entries
                if isinstance(entry, dict)
                and isinstance(entry.get("annotations"), dict)
                and entry["annotations"].get(REF_NAME) == self.ref.tag
            )
            top = Descriptor.of(tagged, "manifest")
            document = parse_json(self._blob(top.digest), "manifest")
            if media_type_of(document, top.media_type) in INDEX_TYPES:
                platform = select_platform(document)
                document = parse_json(self._blob(platform.digest), "manifest")
            return ResolvedImage(top.digest, ImageManifest.parse(document))
        except (OSError, StopIteration, ImageError):
            raise layout_unusable(self.ref) from None

    def copy_blob(self, descriptor: Descriptor, sink: BlobSink) -> None:
        try:
            with open_beneath(self._directory, "blobs/" + descriptor.digest.replace(":", "/")) as (
                stream
            ):
                while chunk := stream.read(CHUNK):
                    sink.write(chunk)
            sink.close()
        except Cancelled:
            sink.abort()
            raise
        except (OSError, ImageError):
            sink.abort()
            raise layout_unusable(self.ref) from None


class LocalLayouts:
    """``oci:`` layouts under ``allowed`` (resolved once: a link among them cannot widen
    the list later)."""

    def __init__(self, allowed: Sequence[Path]) -> None:
        self.allowed = [Path(os.path.realpath(directory)) for directory in allowed]

    @contextmanager
    def open(self, ref: ImageRef) -> Iterator[LocalLayout]:
        path = Path(ref.repository)
        if not path.is_absolute() or "\x00" in ref.repository:
            raise layout_unusable(ref)
        real = Path(os.path.realpath(path))
        if not _under(real, self.allowed):
            raise layout_unusable(ref)
        try:
            directory = _open_directory(real)
        except OSError:
            raise layout_unusable(ref) from None
        try:
            # What was opened is where the real path led, checked again now that it is held.
            opened = Path(os.readlink(f"/proc/self/fd/{directory}"))
            if not _under(opened, self.allowed):
                raise layout_unusable(ref)
            yield LocalLayout(ref, directory)
        finally:
            with contextlib.suppress(OSError):
                os.close(directory)
