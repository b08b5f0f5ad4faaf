"""Fixtures for the VMM tests: boot artefacts shared by the session, machines killed at teardown."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hangar.vmm.accel import AccelChoice, choose_accel
from hangar.vmm.qemu_argv import QEMU_BINARY
from tests.conftest import SUITE_CACHE
from tests.vmm.guest import BootArtefacts, ImageGuest, build_image_guest, build_test_guest
from tests.vmm.machines import Machines


@pytest.fixture(scope="session")
def host_accel() -> AccelChoice:
    return choose_accel()


@pytest.fixture(scope="session")
def boot_artefacts(tmp_path_factory: pytest.TempPathFactory) -> BootArtefacts:
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"{QEMU_BINARY} is not installed")
    return build_test_guest(SUITE_CACHE, tmp_path_factory.mktemp("guest") / "initrd")


@pytest.fixture(scope="session")
def image_guest(tmp_path_factory: pytest.TempPathFactory, test_image: str) -> ImageGuest:
    """hangar's init over the suite's busybox test image (see tests/conftest.py)."""
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"{QEMU_BINARY} is not installed")
    return build_image_guest(SUITE_CACHE, tmp_path_factory.mktemp("image-cache"), test_image)


@pytest.fixture
def machines(boot_artefacts: BootArtefacts) -> Iterator[Machines]:
    base = Path(tempfile.mkdtemp(prefix="hangar-vmm-"))
    tracker = Machines(boot_artefacts, base)
    try:
        yield tracker
    finally:
        tracker.kill_all()
        shutil.rmtree(base, ignore_errors=True)
