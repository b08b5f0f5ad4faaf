"""A machine's root disk as a qcow2 overlay over the cached image: it costs what the machine
writes, not a copy of the image. The base stays read-only (QEMU opens backing files so) and
shared by every machine of that image; the image cache never evicts a base an overlay names
(:func:`overlay_backing` reads which, from the overlay's header)."""

from __future__ import annotations

import struct
from pathlib import Path

from hangar.errors import ImageError
from hangar.images.runner import CommandError, CommandRunner, run_command

QCOW2_MAGIC = b"QFI\xfb"
HEADER = struct.Struct(">4sIQI")
"""magic, version, backing_file_offset, backing_file_size"""
MAX_BACKING_NAME = 4096
OVERLAY_TIMEOUT_S = 60.0


def create_overlay(
    base: Path,
    dest: Path,
    *,
    runner: CommandRunner = run_command,
    timeout_s: float = OVERLAY_TIMEOUT_S,
) -> Path:
    """``dest``: a new qcow2 disk whose reads fall through to the raw image ``base``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        runner(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base.resolve(), dest],
            timeout=timeout_s,
        )
    except CommandError as exc:
        dest.unlink(missing_ok=True)
        raise ImageError(
            f"failed to make a root disk over {base.parent.name}",
            action="overlay",
            stderr=exc.stderr,
        ) from exc
    return dest


def overlay_backing(disk: Path) -> Path | None:
    """The backing file a qcow2 overlay names; None for a disk that is not one (or is gone)."""
    try:
        with disk.open("rb") as stream:
            header = stream.read(HEADER.size)
            if len(header) < HEADER.size:
                return None
            magic, _version, offset, size = HEADER.unpack(header)
            if magic != QCOW2_MAGIC or not offset or not 0 < size <= MAX_BACKING_NAME:
                return None
            stream.seek(offset)
            name = stream.read(size)
    except OSError:
        return None
    return Path(name.decode(errors="surrogateescape"))
