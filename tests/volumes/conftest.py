"""Fixtures for the volume tests: a VolumeHost over a fresh folder, qemu-io on its images, a
size-limited tmpfs for full-disk tests, and (for guest boots) the shared guest kit."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar.bench.guest import GuestKit
from hangar.volumes.host import VolumeHost
from hangar.volumes.settings import VolumeSettings
from tests.conftest import SUITE_CACHE
from tests.volumes.helpers import new_host


@pytest.fixture(autouse=True)
def _qemu_img_installed() -> None:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        pytest.skip("qemu-img / qemu-io are not installed (Debian package qemu-utils)")


@pytest.fixture
def host(tmp_path: Path) -> VolumeHost:
    return new_host(tmp_path / "volumes")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 96 MiB tmpfs of its own: a host disk a test can fill without touching anyone's."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "hangar-test", str(mount_point)],
        check=True,
    )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def small_disk_host(small_disk: Path) -> VolumeHost:
    return VolumeHost(VolumeSettings(root=small_disk / "volumes", reserve_bytes=0))


@pytest.fixture(scope="session")
def guest_kit(oci_layout: Path) -> GuestKit:
    """Kernel, base initrd, volume tools and the suite's busybox test image, built once."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("QEMU is not installed")
    return asyncio.run(GuestKit.prepare(SUITE_CACHE, f"oci:{oci_layout}:test"))
