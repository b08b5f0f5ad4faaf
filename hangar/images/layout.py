"""OCI image layouts hangar writes for itself, one image each, from verified parts.

Whatever the source (a registry, an ``oci:`` layout a tenant names), hangar copies the image
by digest into a layout of its own, checking every blob against its digest and size and the
image against the operator's limits, and only then hands that layout to umoci. A Docker
manifest (schema 2) becomes the equivalent OCI manifest; the image keeps the digest of what
its source served.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hangar.errors import ImageError
from hangar.images.reference import DIGEST_PATTERN
from hangar.images.runner import Cancellation

LOCAL_TAG = "image"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
CHUNK = 256 * 1024
REF_NAME = "org.opencontainers.image.ref.name"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
LAYER_TYPES: Mapping[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": (
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ),
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
}
CONFIG_TYPES: Mapping[str, str] = {OCI_CONFIG: OCI_CONFIG, DOCKER_CONFIG: OCI_CONFIG}
PLATFORM = {"os": "linux", "architecture": "amd64"}
TAR_BLOCK = 512


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def of(cls, value: Any, what: str) -> Descriptor:
        try:
            descriptor = cls(str(value["mediaType"]), str(value["digest"]), int(value["size"]))
        except (TypeError, KeyError, ValueError):
            raise bad_image(f"its {what} is not a valid descriptor") from None
        if not DIGEST_PATTERN.fullmatch(descriptor.digest) or descriptor.size < 0:
            raise bad_image(f"its {what} is not a valid descriptor")
        return descriptor

    def as_json(self, media_type: str | None = None) -> dict[str, Any]:
        return {
            "mediaType": media_type or self.media_type,
            "digest": self.digest,
            "size": self.size,
        }


def bad_image(reason: str) -> ImageError:
    return ImageError(f"the image is not usable: {reason}", reason="bad_image")


def too_large(what: str, limit_bytes: int) -> ImageError:
    return ImageError(
        f"the image is larger than the {limit_bytes // (1024 * 1024)} MiB {what} this host allows",
        reason="too_large",
        limit_bytes=limit_bytes,
    )


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad_image(f"its {what} is not JSON") from None
    if not isinstance(value, dict):
        raise bad_image(f"its {what} is not a JSON object")
    return value


def media_type_of(document: Mapping[str, Any], declared: str) -> str:
    found = document.get("mediaType")
    return str(found) if isinstance(found, str) and found else declared


def select_platform(index: Mapping[str, Any]) -> Descriptor:
    """The linux/amd64 manifest of an index (manifest list)."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise bad_image("its index lists no manifests")
    for entry in manifests:
        platform = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(platform, dict) and all(platform.get(k) == v for k, v in PLATFORM.items()):
            return Descriptor.of(entry, "platform manifest")
    raise ImageError("the image has no linux/amd64 manifest", reason="no_platform")


@dataclass(frozen=True)
class ImageManifest:
    """A platform manifest: its config and layers, as the source describes them."""

    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, document: Mapping[str, Any]) -> ImageManifest:
        config = Descriptor.of(document.get("config"), "config")
        layers = document.get("layers")
        if not isinstance(layers, list) or not layers:
            raise bad_image("its manifest has no layers")
        parsed = tuple(Descriptor.of(layer, "layer") for layer in layers)
        for layer in parsed:
            if layer.media_type not in LAYER_TYPES:
                raise bad_image(f"layer media type {layer.media_type!r} is not supported")
        if config.media_type not in CONFIG_TYPES:
            raise bad_image(f"config media type {config.media_type!r} is not supported")
        return cls(config, parsed)

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        return (self.config, *self.layers)

    def compressed_bytes(self) -> int:
        return sum(blob.size for blob in self.blobs)

    def oci_manifest(self) -> bytes:
        """The OCI manifest of this image (what umoci reads)."""
        document = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": self.config.as_json(CONFIG_TYPES[self.config.media_type]),
            "layers": [layer.as_json(LAYER_TYPES[layer.media_type]) for layer in self.layers],
        }
        return json.dumps(document, separators=(",", ":")).encode()


class BlobSink:
    """Writes one blob into a layout, checking its size and digest as the bytes arrive."""

    def __init__(self, layout: Path, descriptor: Descriptor, cancellation: Cancellation | None):
        self.descriptor = descriptor
        algorithm, _, encoded = descriptor.digest.partition(":")
        self.path = layout / "blobs" / algorithm / encoded
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(encoded + ".partial")
        self._file: IO[bytes] = self._partial.open("wb")
        self._hash = hashlib.new(algorithm)
        self._cancellation = cancellation
        self.written = 0

    def write(self, chunk: bytes) -> None:
        if self._cancellation is not None:
            self._cancellation.check()
        self.written += len(chunk)
        if self.written > self.descriptor.size:
            raise bad_image(f"blob {self.descriptor.digest} is larger than its manifest says")
        self._hash.update(chunk)
        self._file.write(chunk)

    def close(self) -> None:
        self._file.close()
        algorithm = self.descriptor.digest.partition(":")[0]
        if (
            self.written != self.descriptor.size
            or f"{algorithm}:{self._hash.hexdigest()}" != self.descriptor.digest
        ):
            self._partial.unlink(missing_ok=True)
            raise bad_image(f"blob {self.descriptor.digest} does not match its digest")
        self._partial.rename(self.path)

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)


def start_layout(layout: Path) -> None:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def finish_layout(layout: Path, manifest: ImageManifest) -> None:
    """Write the image's OCI manifest and the index naming it :data:`LOCAL_TAG`."""
    raw = manifest.oci_manifest()
    digest = digest_of(raw)
    blob = layout / "blobs" / "sha256" / digest.partition(":")[2]
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(raw)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(raw),
                "annotations": {REF_NAME: LOCAL_TAG},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def check_unpacked_size(
    layout: Path, manifest: ImageManifest, limit_bytes: int, cancellation: Cancellation | None
) -> int:
    """What the image's layers hold once unpacked (file sizes and tar headers, summed over
    every layer, before anything is written); ``ImageError`` past ``limit_bytes``. A layer
    that says it holds a huge file is refused at its header, without reading the file."""
    total = 0
    for layer in manifest.layers:
        path = layout / "blobs" / layer.digest.replace(":", "/")
        try:
            with tarfile.open(path, mode="r|*") as archive:
                for member in archive:
                    if cancellation is not None:
                        cancellation.check()
                    total += TAR_BLOCK + max(0, member.size)
                    if total > limit_bytes:
                        raise too_large("unpacked", limit_bytes)
        except (tarfile.TarError, OSError, EOFError):
            raise bad_image(f"layer {layer.digest} is not a readable tar archive") from None
    return total


def read_capped(stream: IO[bytes], limit: int, what: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise bad_image(f"its {what} is larger than {limit} bytes")
    return data


def open_beneath(root_fd: int, relative: str) -> IO[bytes]:
    """Open ``relative`` under the directory ``root_fd`` without following a link anywhere in
    it (a layout whose ``blobs`` is a link out of it reads nothing outside)."""
    parts = [part for part in relative.split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise FileNotFoundError(relative)
    directory = root_fd
    opened: list[int] = []
    try:
        for part in parts[:-1]:
            directory = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory
            )
            opened.append(directory)
        descriptor = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
    finally:
        for fd in opened:
            os.close(fd)
    return os.fdopen(descriptor, "rb")
