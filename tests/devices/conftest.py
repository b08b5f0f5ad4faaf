"""Fixture hosts and helpers shared by the devices tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from hangar.devices.readiness import CommandResult
from tests.devices.sysfs_fixture import (
    SysfsBuilder,
    build_a10_with_audio,
    build_gpu_sharing_group_with_nic,
    build_hgx_h100,
    build_l40s,
    build_without_iommu,
)

QEMU_VERSION = "QEMU emulator version 7.2.0"


class StaticRunner:
    """Answers commands from a table by program name; unknown programs exit 127."""

    def __init__(self, answers: Mapping[str, CommandResult]) -> None:
        self.answers = dict(answers)
        self.commands: list[list[str]] = []

    def run(self, argv: Sequence[str]) -> CommandResult:
        self.commands.append(list(argv))
        return self.answers.get(argv[0], CommandResult(returncode=127, stderr="not found"))


def ready_runner() -> StaticRunner:
    """A host with QEMU installed and no vfio-pci module on disk."""
    return StaticRunner(
        {
            "qemu-system-x86_64": CommandResult(returncode=0, stdout=QEMU_VERSION + "\n"),
            "modinfo": CommandResult(returncode=1, stderr="modinfo: ERROR: Module vfio-pci"),
        }
    )


@pytest.fixture
def hgx(tmp_path: Path) -> SysfsBuilder:
    return build_hgx_h100(tmp_path / "sys")


@pytest.fixture
def l40s(tmp_path: Path) -> SysfsBuilder:
    return build_l40s(tmp_path / "sys")


@pytest.fixture
def a10(tmp_path: Path) -> SysfsBuilder:
    return build_a10_with_audio(tmp_path / "sys")


@pytest.fixture
def shared_with_nic(tmp_path: Path) -> SysfsBuilder:
    return build_gpu_sharing_group_with_nic(tmp_path / "sys")


@pytest.fixture
def no_iommu(tmp_path: Path) -> SysfsBuilder:
    return build_without_iommu(tmp_path / "sys")
