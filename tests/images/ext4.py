"""Read an ext4 image without mounting it (debugfs), for assertions."""

from __future__ import annotations

import subprocess
from pathlib import Path


def list_dir(image: Path, folder: str) -> dict[str, int]:
    """Names in ``folder`` of the ext4 ``image``, with their modes (``debugfs ls -p``)."""
    listing = subprocess.run(
        ["debugfs", "-R", f"ls -p {folder}", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    entries: dict[str, int] = {}
    for line in listing.splitlines():
        fields = line.strip().strip("/").split("/")
        if len(fields) >= 5 and fields[4] not in (".", ".."):
            entries[fields[4]] = int(fields[1], 8)
    return entries


def read_file(image: Path, path: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], check=True, capture_output=True
    ).stdout
