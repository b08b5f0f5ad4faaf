"""The driver records: what the agent stores and reads back."""

from __future__ import annotations

from pathlib import Path

from hangar.vmm.accel import tcg_choice
from hangar.vmm.driver import Driver, VmHandle, VmSpec
from hangar.vmm.qemu import QemuDriver


def test_qemu_driver_is_a_driver() -> None:
    driver: Driver = QemuDriver(accel=tcg_choice("test"))

    assert isinstance(driver, Driver)
    assert driver.name == "qemu"


def test_spec_in_run_dir_puts_logs_and_sockets_there(tmp_path: Path) -> None:
    spec = VmSpec.in_run_dir(
        machine_id="m1",
        run_dir=tmp_path,
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd",
        root_disk=tmp_path / "root.ext4",
    )

    paths = (
        spec.console_log,
        spec.control_log,
        spec.signal_socket,
        spec.exec_socket,
        spec.qmp_socket,
        spec.vmm_log,
    )
    assert {path.parent for path in paths} == {tmp_path}
    assert len({path.name for path in paths}) == len(paths)
    assert VmSpec.model_validate_json(spec.model_dump_json()) == spec


def test_handle_survives_a_json_round_trip(tmp_path: Path) -> None:
    handle = VmHandle(
        driver="qemu",
        machine_id="m1",
        pid=4242,
        start_time=98765,
        qmp_socket=tmp_path / "qmp.sock",
        signal_socket=tmp_path / "sig.sock",
        control_log=tmp_path / "ctl.jsonl",
        console_log=tmp_path / "console.log",
        vmm_log=tmp_path / "vmm.log",
        accel="tcg",
        machine_type="q35",
    )

    assert VmHandle.model_validate_json(handle.model_dump_json()) == handle


def test_a_handle_keeps_its_spec_and_reads_older_records(tmp_path: Path) -> None:
    spec = VmSpec.in_run_dir(
        machine_id="m1",
        run_dir=tmp_path,
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd",
        root_disk=tmp_path / "root.ext4",
    )
    older = {
        "driver": "qemu",
        "machine_id": "m1",
        "pid": 4242,
        "start_time": 98765,
        "qmp_socket": str(spec.qmp_socket),
        "signal_socket": str(spec.signal_socket),
        "control_log": str(spec.control_log),
        "console_log": str(spec.console_log),
        "vmm_log": str(spec.vmm_log),
        "accel": "tcg",
        "machine_type": "q35",
    }
    handle = VmHandle.model_validate(
        older | {"cpu_model": "max", "exec_socket": str(spec.exec_socket), "spec": spec}
    )

    assert VmHandle.model_validate_json(handle.model_dump_json()) == handle
    assert handle.spec == spec
    assert VmHandle.model_validate(older).spec is None
    assert VmHandle.model_validate(older).exec_socket is None
