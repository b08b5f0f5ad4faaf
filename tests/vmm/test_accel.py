"""The acceleration decision, on fixture trees laid out like /dev and /sys."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from hangar.settings import Settings
from hangar.vmm.accel import AccelChoice, choose_accel


def host_tree(root: Path, *, kvm_device: bool, pvm: bool) -> tuple[Path, Path]:
    dev, sys = root / "dev", root / "sys"
    dev.mkdir()
    (sys / "module" / "kvm" / "parameters").mkdir(parents=True)
    if kvm_device:
        (dev / "kvm").touch()
    if pvm:
        (sys / "module" / "kvm_pvm" / "parameters").mkdir(parents=True)
    return dev, sys


def decide(root: Path, *, kvm_device: bool, pvm: bool, **environ: str) -> AccelChoice:
    """The decision for a host tree, with settings read from ``environ`` as the server
    reads them from its environment."""
    dev, sys = host_tree(root, kvm_device=kvm_device, pvm=pvm)
    settings = Settings(_env_file=None, **{key.lower(): value for key, value in environ.items()})
    return choose_accel(
        forced=settings.accel,
        pvm_guest_kernel=settings.pvm_guest_kernel,
        dev_root=dev,
        sys_root=sys,
    )


def test_kvm_host_gets_microvm_with_the_host_cpu(tmp_path: Path) -> None:
    choice = decide(tmp_path, kvm_device=True, pvm=False)

    assert (choice.accel, choice.machine_type, choice.cpu_model) == (
        "kvm",
        "microvm,isa-serial=on,pcie=on",
        "host",
    )


def test_pvm_host_gets_tcg_with_q35(tmp_path: Path) -> None:
    choice = decide(tmp_path, kvm_device=True, pvm=True)

    assert (choice.accel, choice.machine_type, choice.cpu_model) == ("tcg", "q35", "max")
    assert "kvm-pvm" in choice.reason


def test_pvm_host_with_a_pvm_guest_kernel_gets_kvm(tmp_path: Path) -> None:
    choice = decide(tmp_path, kvm_device=True, pvm=True, PVM_GUEST_KERNEL="1")

    assert choice.accel == "kvm"
    assert "HANGAR_PVM_GUEST_KERNEL" in choice.reason


def test_host_without_dev_kvm_gets_tcg(tmp_path: Path) -> None:
    choice = decide(tmp_path, kvm_device=False, pvm=False)

    assert (choice.accel, choice.machine_type) == ("tcg", "q35")
    assert str(tmp_path / "dev" / "kvm") in choice.reason


def test_forced_tcg_wins_over_a_working_kvm(tmp_path: Path) -> None:
    choice = decide(tmp_path, kvm_device=True, pvm=False, ACCEL="tcg")

    assert (choice.accel, choice.machine_type) == ("tcg", "q35")
    assert "HANGAR_ACCEL" in choice.reason


def test_forced_kvm_wins_over_a_missing_dev_kvm(tmp_path: Path) -> None:
    choice = decide(tmp_path, kvm_device=False, pvm=True, ACCEL="KVM")

    assert choice.accel == "kvm"


def test_unknown_forced_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as raised:
        decide(tmp_path, kvm_device=True, pvm=False, ACCEL="hvf")

    assert raised.value.errors()[0]["loc"] == ("accel",)


def test_the_decision_is_logged_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="hangar.vmm.accel"):
        choice = decide(tmp_path, kvm_device=True, pvm=True)

    assert any(choice.reason in record.getMessage() for record in caplog.records)
