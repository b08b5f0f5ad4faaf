"""The QEMU command line for a :class:`VmSpec`: pure, so tests read it without booting."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from hangar.errors import VmmError
from hangar.vmm.accel import AccelChoice
from hangar.vmm.driver import (
    CONTROL_PORT_NAME,
    EXEC_PORT_NAME,
    GUEST_KERNEL_CMDLINE,
    SIGNAL_PORT_NAME,
    DiskSpec,
    VmSpec,
)

QEMU_BINARY = "qemu-system-x86_64"
HUGEPAGES_DIR = Path("/dev/hugepages")
# sun_path holds 108 bytes, the terminating NUL included.
UNIX_SOCKET_PATH_MAX = 107


def machine_process_name(machine_id: str) -> str:
    """The ``-name`` that tells one machine's QEMU apart in ``/proc/PID/cmdline``."""
    return f"hangar-{machine_id}"


def option_value(value: str | Path) -> str:
    """A value inside a QEMU ``key=value,...`` option, where a comma is written twice."""
    return str(value).replace(",", ",,")


def check_spec_files(spec: VmSpec, *, hugepages_dir: Path = HUGEPAGES_DIR) -> None:
    """Raise :class:`VmmError` naming the first input that is missing or unusable."""
    inputs: list[tuple[str, Path]] = [
        ("kernel", spec.kernel),
        ("initrd", spec.initrd),
        ("root_disk", spec.root_disk),
    ]
    inputs += [(f"extra_disks[{i}]", disk.path) for i, disk in enumerate(spec.extra_disks)]
    for field, path in inputs:
        if not path.exists():
            raise VmmError(
                f"{field} {path} does not exist",
                machine_id=spec.machine_id,
                field=field,
                path=str(path),
            )
    for field, socket_path in (
        ("qmp_socket", spec.qmp_socket),
        ("signal_socket", spec.signal_socket),
        ("exec_socket", spec.exec_socket),
    ):
        if len(os.fsencode(socket_path)) > UNIX_SOCKET_PATH_MAX:
            raise VmmError(
                f"{field} {socket_path} is longer than a unix socket path may be "
                f"({UNIX_SOCKET_PATH_MAX} bytes)",
                machine_id=spec.machine_id,
                field=field,
                path=str(socket_path),
            )
    if spec.hugepages and not hugepages_dir.is_dir():
        raise VmmError(
            f"hugepages requested but {hugepages_dir} is not a mounted hugetlbfs directory",
            machine_id=spec.machine_id,
            field="hugepages",
            path=str(hugepages_dir),
        )


def qemu_argv(
    spec: VmSpec,
    accel: AccelChoice,
    *,
    binary: str = QEMU_BINARY,
    hugepages_dir: Path = HUGEPAGES_DIR,
) -> list[str]:
    machine = accel.machine_type
    memory_backend: list[str] = []
    if spec.hugepages:
        machine += ",memory-backend=ram0"
        memory_backend = [
            "-object",
            f"memory-backend-file,id=ram0,size={spec.memory_mb}M,"
            f"mem-path={option_value(hugepages_dir)},share=on,prealloc=on",
        ]
    argv = [
        binary,
        "-name",
        machine_process_name(spec.machine_id),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-machine",
        machine,
        "-accel",
        accel.accel,
        "-cpu",
        accel.cpu_model,
        "-smp",
        str(spec.cpus),
        "-m",
        f"{spec.memory_mb}M",
        *memory_backend,
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        " ".join([GUEST_KERNEL_CMDLINE, *spec.kernel_args]),
    ]
    disks = [(spec.root_disk, False)] + [(d.path, d.read_only) for d in spec.extra_disks]
    for index, (path, read_only) in enumerate(disks):
        drive = f"id=disk{index},file={option_value(path)},format=raw,if=none"
        if read_only:
            drive += ",readonly=on"
        argv += ["-drive", drive, "-device", f"virtio-blk-pci,drive=disk{index}"]
    # A restored guest goes on writing the logs its first boot began.
    log_mode = ",append=on" if spec.incoming_snapshot is not None else ""
    argv += [
        "-chardev",
        f"file,id=console,path={option_value(spec.console_log)}{log_mode}",
        "-serial",
        "chardev:console",
        "-device",
        "virtio-serial-pci,id=vs",
        "-chardev",
        f"file,id=ctl,path={option_value(spec.control_log)}{log_mode}",
        "-device",
        f"virtserialport,bus=vs.0,chardev=ctl,name={CONTROL_PORT_NAME}",
        "-chardev",
        f"socket,id=sig,path={option_value(spec.signal_socket)},server=on,wait=off",
        "-device",
        f"virtserialport,bus=vs.0,chardev=sig,name={SIGNAL_PORT_NAME}",
        "-chardev",
        f"socket,id=exec,path={option_value(spec.exec_socket)},server=on,wait=off",
        "-device",
        f"virtserialport,bus=vs.0,chardev=exec,name={EXEC_PORT_NAME}",
        "-chardev",
        f"socket,id=qmp,path={option_value(spec.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    for bdf in spec.gpus:
        argv += ["-device", f"vfio-pci,host={bdf}"]
    if spec.incoming_snapshot is not None:
        # QEMU 7.2 has no file: migration transport; exec:cat streams the file in. -S keeps
        # the vCPUs stopped once it is loaded, whatever state the snapshot says.
        argv += ["-S", "-incoming", f"exec:cat {shlex.quote(str(spec.incoming_snapshot))}"]
    return argv


def snapshot_fingerprint(spec: VmSpec, accel: AccelChoice, *, hugepages_dir: Path) -> list[str]:
    """The command line of ``spec`` with every host path replaced by a fixed name.

    A snapshot restores only into a QEMU whose devices, memory, CPUs and machine are those
    it was saved from; paths of logs, sockets and files may differ (the files themselves
    are compared by :mod:`hangar.vmm.snapshot`). Equal fingerprints mean an equal device
    model, whatever changes in this module.
    """
    placeholders = spec.model_copy(
        update={
            "run_dir": Path("run"),
            "kernel": Path("kernel"),
            "initrd": Path("initrd"),
            "root_disk": Path("disk0"),
            "extra_disks": [
                DiskSpec(path=Path(f"disk{index}"), read_only=disk.read_only)
                for index, disk in enumerate(spec.extra_disks, start=1)
            ],
            "console_log": Path("console.log"),
            "control_log": Path("ctl.log"),
            "signal_socket": Path("sig.sock"),
            "exec_socket": Path("exec.sock"),
            "qmp_socket": Path("qmp.sock"),
            "vmm_log": Path("vmm.log"),
            "incoming_snapshot": None,
        }
    )
    return qemu_argv(placeholders, accel, binary="qemu", hugepages_dir=hugepages_dir)
