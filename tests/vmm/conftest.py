"""Fixtures for the VMM tests: hangar's init over the test image, shared by the session;
machines killed at teardown."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar.vmm.accel import AccelChoice, choose_accel
from hangar.vmm.qemu_argv import QEMU_BINARY
from tests.conftest import SUITE_CACHE
from tests.vmm.guest import ImageGuest, build_image_guest
from tests.vmm.machines import Machines


@pytest.fixture(scope="session")
def host_accel() -> AccelChoice:
    return choose_accel()


@pytest.fixture(scope="session")
def image_guest(tmp_path_factory: pytest.TempPathFactory, test_image: str) -> ImageGuest:
    """hangar's init over the suite's busybox test image (see tests/conftest.py)."""
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"{QEMU_BINARY} is not installed")
    return build_image_guest(SUITE_CACHE, tmp_path_factory.mktemp("image-cache"), test_image)


@pytest.fixture
def machines(image_guest: ImageGuest) -> Iterator[Machines]:
    base = Path(tempfile.mkdtemp(prefix="hangar-vmm-"))
    tracker = Machines(image_guest, base)
    try:
        yield tracker
    finally:
        tracker.kill_all()
        shutil.rmtree(base, ignore_errors=True)
