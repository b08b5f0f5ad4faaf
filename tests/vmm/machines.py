"""Test machines: specs in short-lived run dirs, and every QEMU they got killed at the end."""

from __future__ import annotations

import signal
from pathlib import Path

from hangar.vmm.driver import DiskSpec, VmHandle, VmSpec
from hangar.vmm.proc import ProcessRef
from tests.vmm.guest import HANG_GUARD_S, BootArtefacts, ImageGuest

DISK_BYTES = 1 << 20


class Machines:
    """Makes specs for test machines and kills every QEMU they got at teardown."""

    def __init__(self, artefacts: BootArtefacts, base: Path) -> None:
        self._artefacts = artefacts
        self._base = base
        self._handles: list[VmHandle] = []

    def spec(self, machine_id: str, *kernel_args: str, read_only_disk: bool = False) -> VmSpec:
        # Short paths: unix socket paths must stay under 108 bytes.
        run_dir = self._base / machine_id
        run_dir.mkdir()
        root_disk = run_dir / "root.img"
        root_disk.write_bytes(b"\0" * DISK_BYTES)
        extra_disks = []
        if read_only_disk:
            bundle = run_dir / "bundle.img"
            bundle.write_bytes(b"\0" * DISK_BYTES)
            extra_disks.append(DiskSpec(path=bundle, read_only=True))
        return VmSpec.in_run_dir(
            machine_id=machine_id,
            run_dir=run_dir,
            kernel=self._artefacts.kernel,
            initrd=self._artefacts.initrd,
            root_disk=root_disk,
            extra_disks=extra_disks,
            kernel_args=[f"hangar_test.deadline={int(HANG_GUARD_S)}", *kernel_args],
        )

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
