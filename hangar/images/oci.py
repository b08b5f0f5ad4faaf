"""Pull an image with skopeo into a local OCI layout, read its config, unpack it with umoci."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hangar.errors import ImageError
from hangar.images.image_config import ImageConfig
from hangar.images.reference import ImageRef
from hangar.images.runner import CommandError, CommandRunner, run_command, stdout_bytes

LOCAL_TAG = "image"
_NOT_FOUND_MARKERS = (
    "manifest unknown",
    "name unknown",
    "not found",
    "no such file or directory",
    "requested access to the resource is denied",
)
# What skopeo says when the registry did not answer (worth a retry), not when it said no.
_UNREACHABLE_MARKERS = (
    "connection refused",
    "connection reset",
    "i/o timeout",
    "timeout awaiting",
    "tls handshake timeout",
    "no route to host",
    "temporary failure",
    "too many requests",
    "service unavailable",
    "bad gateway",
    ": eof",
)
_INDEX_MEDIA_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


def _image_error(ref: ImageRef, action: str, error: CommandError) -> ImageError:
    lowered = error.stderr.lower()
    if action in ("resolve", "pull") and any(marker in lowered for marker in _NOT_FOUND_MARKERS):
        message = f"image {ref} not found"
    else:
        message = f"failed to {action} image {ref}"
    return ImageError(
        f"{message}: {error.stderr or error.message}",
        ref=str(ref),
        action=action,
        stderr=error.stderr,
        retryable=any(marker in lowered for marker in _UNREACHABLE_MARKERS),
    )


def _tls_flag(ref: ImageRef, flag: str, tls_verify: bool) -> list[str]:
    if ref.transport == "docker" and not tls_verify:
        return [f"{flag}=false"]
    return []


def resolve_digest(
    ref: ImageRef, *, tls_verify: bool = True, runner: CommandRunner = run_command
) -> str:
    """The digest of the manifest (or index) ``ref`` names now: sha256 of its raw bytes."""
    if ref.digest:
        return ref.digest
    argv = ["skopeo", "inspect", "--raw", *_tls_flag(ref, "--tls-verify", tls_verify)]
    try:
        raw = runner([*argv, ref.skopeo_name()])
    except CommandError as exc:
        raise _image_error(ref, "resolve", exc) from exc
    return "sha256:" + hashlib.sha256(stdout_bytes(raw)).hexdigest()


def pull(
    ref: ImageRef,
    layout: Path,
    *,
    tls_verify: bool = True,
    runner: CommandRunner = run_command,
) -> None:
    """Copy ``ref`` (this host's platform, if it is an index) into the OCI layout ``layout``."""
    argv = ["skopeo", "copy", "--quiet", *_tls_flag(ref, "--src-tls-verify", tls_verify)]
    try:
        runner([*argv, ref.skopeo_name(), f"oci:{layout}:{LOCAL_TAG}"])
    except CommandError as exc:
        raise _image_error(ref, "pull", exc) from exc


def _blob(layout: Path, digest: str) -> dict[str, Any]:
    algorithm, _, encoded = digest.partition(":")
    document: dict[str, Any] = json.loads((layout / "blobs" / algorithm / encoded).read_bytes())
    return document


def read_config(ref: ImageRef, layout: Path, tag: str = LOCAL_TAG) -> ImageConfig:
    """The image config of image ``tag`` (by default, the one ``pull`` wrote) in ``layout``."""
    try:
        index = json.loads((layout / "index.json").read_bytes())
        descriptor = next(
            entry
            for entry in index.get("manifests", [])
            if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
        )
        if descriptor.get("mediaType") in _INDEX_MEDIA_TYPES:
            raise ImageError(
                f"image {ref} has no manifest for this platform", ref=str(ref), action="read"
            )
        manifest = _blob(layout, descriptor["digest"])
        return ImageConfig.from_oci(_blob(layout, manifest["config"]["digest"]))
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise ImageError(
            f"image {ref} has an unreadable manifest or config: {exc}", ref=str(ref), action="read"
        ) from exc


def unpack(
    ref: ImageRef,
    layout: Path,
    bundle: Path,
    *,
    rootless: bool | None = None,
    runner: CommandRunner = run_command,
) -> Path:
    """Unpack the pulled image into the runtime bundle ``bundle``; return its ``rootfs``.

    ``rootless`` defaults to "not root": as root, umoci keeps the layers' file owners,
    which the guest needs (a non-root user's home stays theirs).
    """
    if rootless is None:
        rootless = os.geteuid() != 0
    argv = ["umoci", "unpack", *(["--rootless"] if rootless else [])]
    try:
        runner([*argv, "--image", f"{layout}:{LOCAL_TAG}", bundle])
    except CommandError as exc:
        raise _image_error(ref, "unpack", exc) from exc
    return bundle / "rootfs"
