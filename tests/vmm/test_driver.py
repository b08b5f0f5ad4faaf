"""The driver records: what the agent stores and reads back."""

from __future__ import annotations

from pathlib import Path

from hangar.vmm.accel import tcg_choice
from hangar.vmm.driver import Driver, VmHandle, VmSpec
from hangar.vmm.qemu import QemuDriver
from tests.vmm.machines import handle_for, plain_spec


def test_qemu_driver_is_a_driver() -> None:
    driver: Driver = QemuDriver(accel=tcg_choice("test"))

    assert isinstance(driver, Driver)
    assert driver.name == "qemu"


def test_spec_in_run_dir_puts_logs_and_sockets_there(tmp_path: Path) -> None:
    spec = plain_spec(tmp_path)

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


def test_a_handle_keeps_its_spec_and_reads_older_records(tmp_path: Path) -> None:
    spec = plain_spec(tmp_path)
    handle = handle_for(spec)
    newer_fields = {"cpu_model", "exec_socket", "spec"}
    older = handle.model_dump(mode="json", exclude=newer_fields)

    assert VmHandle.model_validate_json(handle.model_dump_json()) == handle
    assert handle.spec == spec
    assert VmHandle.model_validate(older).spec is None
    assert VmHandle.model_validate(older).exec_socket is None
