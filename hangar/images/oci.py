"""Read an image's config from a local OCI layout, and unpack the image with umoci.

The layouts read here are hangar's own (:mod:`hangar.images.layout`): written from verified
blobs, one image tagged ``image``. Pulls are :mod:`hangar.images.registry` and
:mod:`hangar.images.local_layout`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hangar.errors import ImageError
from hangar.images.image_config import ImageConfig
from hangar.images.layout import INDEX_TYPES, LOCAL_TAG
from hangar.images.reference import ImageRef
from hangar.images.runner import CommandError, CommandRunner, run_command

UNPACK_TIMEOUT_S = 600.0


def _blob(layout: Path, digest: str) -> dict[str, Any]:
    algorithm, _, encoded = digest.partition(":")
    document: dict[str, Any] = json.loads((layout / "blobs" / algorithm / encoded).read_bytes())
    return document


def read_config(ref: ImageRef, layout: Path, tag: str = LOCAL_TAG) -> ImageConfig:
    """The image config of image ``tag`` (by default, the one hangar wrote) in ``layout``."""
    try:
        index = json.loads((layout / "index.json").read_bytes())
        descriptor = next(
            entry
            for entry in index.get("manifests", [])
            if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
        )
        if descriptor.get("mediaType") in INDEX_TYPES:
            raise ImageError(
                f"image {ref} has no manifest for this platform", ref=str(ref), action="read"
            )
        manifest = _blob(layout, descriptor["digest"])
        return ImageConfig.from_oci(_blob(layout, manifest["config"]["digest"]))
    except (OSError, ValueError, KeyError, StopIteration, TypeError, AttributeError) as exc:
        raise ImageError(
            f"image {ref} has an unreadable manifest or config", ref=str(ref), action="read"
        ) from exc


def unpack(
    ref: ImageRef,
    layout: Path,
    bundle: Path,
    *,
    rootless: bool | None = None,
    runner: CommandRunner = run_command,
    timeout_s: float = UNPACK_TIMEOUT_S,
) -> Path:
    """Unpack the image into the runtime bundle ``bundle``; return its ``rootfs``.

    ``rootless`` defaults to "not root": as root, umoci keeps the layers' file owners,
    which the guest needs (a non-root user's home stays theirs).
    """
    if rootless is None:
        rootless = os.geteuid() != 0
    argv = ["umoci", "unpack", *(["--rootless"] if rootless else [])]
    try:
        runner([*argv, "--image", f"{layout}:{LOCAL_TAG}", bundle], timeout=timeout_s)
    except CommandError as exc:
        raise ImageError(
            f"failed to unpack image {ref}" + (" in time" if exc.returncode is None else ""),
            ref=str(ref),
            action="unpack",
            stderr=exc.stderr,
        ) from exc
    return bundle / "rootfs"
