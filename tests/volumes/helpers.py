"""Helpers for the volume tests: a host over a folder, and qemu-io on a volume's image (with
its key passed as a file, the way hangar passes it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from hangar.clock import Clock
from hangar.volumes.host import VolumeHost
from hangar.volumes.qemu_img import SOURCE_SECRET_ID
from hangar.volumes.settings import VolumeSettings

MIB = 1 << 20


def new_host(root: Path, clock: Clock | None = None, grace_s: float = 3600.0) -> VolumeHost:
    settings = VolumeSettings(root=root, reserve_bytes=0, orphan_grace_s=grace_s)
    return VolumeHost(settings, clock=clock)


def qemu_io(host: VolumeHost, volume_id: str, command: str) -> subprocess.CompletedProcess[str]:
    """Run one qemu-io command on the volume's image; the caller reads returncode/stdout."""
    with host._access(volume_id) as access:
        argv = ["qemu-io", *access.objects(SOURCE_SECRET_ID), "--image-opts"]
        argv += ["-c", command, access.image_opts(SOURCE_SECRET_ID)]
        return subprocess.run(argv, capture_output=True, text=True, check=False)


def write_pattern(host: VolumeHost, volume_id: str, pattern: int, offset: int, length: int) -> None:
    result = qemu_io(host, volume_id, f"write -P {pattern:#x} {offset} {length}")
    assert result.returncode == 0, result.stdout + result.stderr


def holds_pattern(host: VolumeHost, volume_id: str, pattern: int, offset: int, length: int) -> bool:
    result = qemu_io(host, volume_id, f"read -P {pattern:#x} {offset} {length}")
    return result.returncode == 0 and "verification failed" not in result.stdout
