"""The QEMU command line for a :class:`VmSpec`: pure, so tests read it without booting."""

from __future__ import annotations

import os
from pathlib import Path

from hangar.errors import VmmError
from hangar.vmm.accel import AccelChoice
from hangar.vmm.driver import (
    CONTROL_PORT_NAME,
    GUEST_KERNEL_CMDLINE,
    SIGNAL_PORT_NAME,
    VmSpec,
    VolumeDiskSpec,
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
    for i, volume in enumerate(spec.volumes):
        inputs.append((f"volumes[{i}]", volume.image))
        if volume.key_file is not None:
            inputs.append((f"volumes[{i}].key_file", volume.key_file))
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


def volume_node_name(name: str) -> str:
    """The block node of volume ``name``: QMP commands on the volume (resize, snapshots)
    address it by this name."""
    return name


def volume_args(volume: VolumeDiskSpec) -> list[str]:
    """``-object``/``-blockdev``/``-device`` for one volume: a qcow2 node (LUKS-encrypted
    when a key file is given, the passphrase read from that file) on a file node, attached
    as virtio-blk with the volume's name as its serial. Discards from the guest free the
    image's clusters; on a full host disk the VM pauses (``werror=enospc``) so nothing is
    lost, and QMP ``query-block`` names the volume."""
    node = volume_node_name(volume.name)
    read_only = ",read-only=on" if volume.read_only else ""
    args: list[str] = []
    qcow2 = f"driver=qcow2,node-name={node},file={node}-file,discard=unmap{read_only}"
    if volume.key_file is not None:
        args += ["-object", f"secret,id={node}-key,file={option_value(volume.key_file)}"]
        qcow2 += f",encrypt.format=luks,encrypt.key-secret={node}-key"
    args += [
        "-blockdev",
        f"driver=file,node-name={node}-file,filename={option_value(volume.image)},"
        f"discard=unmap{read_only}",
        "-blockdev",
        qcow2,
        "-device",
        f"virtio-blk-pci,drive={node},id={node}-disk,serial={volume.name},"
        "werror=enospc,rerror=report",
    ]
    return args


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
    for volume in spec.volumes:
        argv += volume_args(volume)
    argv += [
        "-chardev",
        f"file,id=console,path={option_value(spec.console_log)}",
        "-serial",
        "chardev:console",
        "-device",
        "virtio-serial-pci,id=vs",
        "-chardev",
        f"file,id=ctl,path={option_value(spec.control_log)}",
        "-device",
        f"virtserialport,bus=vs.0,chardev=ctl,name={CONTROL_PORT_NAME}",
        "-chardev",
        f"socket,id=sig,path={option_value(spec.signal_socket)},server=on,wait=off",
        "-device",
        f"virtserialport,bus=vs.0,chardev=sig,name={SIGNAL_PORT_NAME}",
        "-chardev",
        f"socket,id=qmp,path={option_value(spec.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    for bdf in spec.gpus:
        argv += ["-device", f"vfio-pci,host={bdf}"]
    return argv
