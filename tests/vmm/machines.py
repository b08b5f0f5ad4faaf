"""Test machines: specs in short-lived run dirs, and every QEMU they got killed at the end;
and plain spec and handle records for tests that start no QEMU."""

from __future__ import annotations

import signal
from pathlib import Path

from hangar.vmm.driver import DiskSpec, VmHandle, VmSpec
from hangar.vmm.proc import ProcessRef
from tests.vmm.guest import ImageGuest

DISK_BYTES = 1 << 20


def plain_spec(run_dir: Path, machine_id: str = "m1", **fields: object) -> VmSpec:
    """A spec whose kernel, initrd and root disk sit in ``run_dir`` (they need not exist)."""
    spec = VmSpec.in_run_dir(
        machine_id=machine_id,
        run_dir=run_dir,
        kernel=run_dir / "vmlinuz",
        initrd=run_dir / "initrd",
        root_disk=run_dir / "root.ext4",
    )
    return spec.model_copy(update=fields)


def handle_for(spec: VmSpec, **fields: object) -> VmHandle:
    """The record QemuDriver.launch keeps for ``spec``, with no process behind it."""
    handle = VmHandle(
        driver="qemu",
        machine_id=spec.machine_id,
        pid=4242,
        start_time=98765,
        qmp_socket=spec.qmp_socket,
        signal_socket=spec.signal_socket,
        control_log=spec.control_log,
        console_log=spec.console_log,
        vmm_log=spec.vmm_log,
        accel="tcg",
        machine_type="q35",
        cpu_model="max",
        exec_socket=spec.exec_socket,
        spec=spec,
    )
    return handle.model_copy(update=fields)


class Machines:
    """Makes specs for test machines (hangar's own init running a command in the test image's
    root disk, as a machine runs) and kills every QEMU they got at teardown."""

    def __init__(self, guest: ImageGuest, base: Path) -> None:
        self._guest = guest
        self._base = base
        self._handles: list[VmHandle] = []

    def spec(self, machine_id: str, argv: list[str], *, read_only_disk: bool = False) -> VmSpec:
        spec = self.image_spec(machine_id, self._guest, argv)
        if not read_only_disk:
            return spec
        bundle = spec.run_dir / "bundle.img"
        bundle.write_bytes(b"\0" * DISK_BYTES)
        return spec.model_copy(update={"extra_disks": [DiskSpec(path=bundle, read_only=True)]})

    def image_spec(self, machine_id: str, guest: ImageGuest, argv: list[str]) -> VmSpec:
        """A machine that boots with hangar's init and runs ``argv`` in the image's root."""
        run_dir = self._base / machine_id
        run_dir.mkdir()
        initrd, root_disk = guest.boot_files(machine_id, run_dir, argv)
        return VmSpec.in_run_dir(
            machine_id=machine_id,
            run_dir=run_dir,
            kernel=guest.kernel,
            initrd=initrd,
            root_disk=root_disk,
        )

    def track(self, handle: VmHandle) -> VmHandle:
        self._handles.append(handle)
        return handle

    def kill_all(self) -> None:
        for handle in self._handles:
            process = ProcessRef.open(handle.pid, handle.start_time)
            if process is not None:
                with process:
                    process.send_signal(signal.SIGKILL)
