"""The QEMU command line for a :class:`VmSpec`: pure, so tests read it without booting.

A GPU machine (``spec.gpu_topology``) gets its own layout, explained option by option in
the README ("4 of 8 H100 SXM"): q35 with KVM, the CPU's physical address bits passed
through with the host's limit, guest memory from huge pages bound to the GPUs' NUMA node
(preallocated by threads running on that node), one ``pxb-pcie`` expander per NUMA node
with a ``pcie-root-port`` per GPU, companions at the GPU's slot with ``multifunction=on``,
and a 64-bit PCI hole sized to the BARs. The whole process runs on that node's CPUs.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from hangar.errors import VmmError
from hangar.model.guest_contract import EXIT_ACK_ARG, GUEST_KERNEL_CMDLINE, Port, RunDir
from hangar.vmm.accel import AccelChoice, gpu_accel
from hangar.vmm.driver import (
    DiskSpec,
    VmSpec,
    VolumeDiskSpec,
)
from hangar.vmm.gpu_topology import (
    GIB,
    PXB_BUS_BASE,
    PXB_BUS_STRIDE,
    GpuTopology,
    MemoryNode,
    cpu_list,
)

QEMU_BINARY = "qemu-system-x86_64"
TASKSET = "taskset"
HUGEPAGES_DIR = Path("/dev/hugepages")
NET_CLASS_DIR = Path("/sys/class/net")
# sun_path holds 108 bytes, the terminating NUL included.
UNIX_SOCKET_PATH_MAX = 107


def machine_process_name(machine_id: str) -> str:
    """The ``-name`` that tells one machine's QEMU apart in ``/proc/PID/cmdline``."""
    return f"hangar-{machine_id}"


def option_value(value: str | Path) -> str:
    """A value inside a QEMU ``key=value,...`` option, where a comma is written twice."""
    return str(value).replace(",", ",,")


def check_spec_files(
    spec: VmSpec, *, hugepages_dir: Path = HUGEPAGES_DIR, net_class_dir: Path = NET_CLASS_DIR
) -> None:
    """Raise :class:`VmmError` naming the first input that is missing or unusable."""
    if spec.container is not None:
        raise VmmError(
            f"machine {spec.machine_id} runs in the sandbox tier: QEMU boots VMs",
            machine_id=spec.machine_id,
            field="container",
        )
    kernel, initrd = spec.boot_files
    inputs: list[tuple[str, Path]] = [
        ("kernel", kernel),
        ("initrd", initrd),
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
        ("console_socket", spec.console_socket),
        ("control_socket", spec.control_socket),
        ("exec_socket", spec.exec_socket),
    ):
        if socket_path is None:
            continue
        if len(os.fsencode(socket_path)) > UNIX_SOCKET_PATH_MAX:
            raise VmmError(
                f"{field} {socket_path} is longer than a unix socket path may be "
                f"({UNIX_SOCKET_PATH_MAX} bytes)",
                machine_id=spec.machine_id,
                field=field,
                path=str(socket_path),
            )
    if spec.nic is not None and not (net_class_dir / spec.nic.tap).exists():
        raise VmmError(
            f"tap {spec.nic.tap} does not exist (the host network makes it before launch)",
            machine_id=spec.machine_id,
            field="nic.tap",
            tap=spec.nic.tap,
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


def volume_block_nodes(volume: VolumeDiskSpec) -> list[tuple[str, str]]:
    """(option, value) pairs that open one volume, as QEMU and qemu-storage-daemon both
    take them: a qcow2 node named after the volume (LUKS-encrypted when a key file is given,
    the passphrase read from that file as a ``secret`` object) on a file node; discards
    free the image's clusters."""
    node = volume_node_name(volume.name)
    read_only = ",read-only=on" if volume.read_only else ""
    options: list[tuple[str, str]] = []
    qcow2 = f"driver=qcow2,node-name={node},file={node}-file,discard=unmap{read_only}"
    if volume.key_file is not None:
        options.append(("object", f"secret,id={node}-key,file={option_value(volume.key_file)}"))
        qcow2 += f",encrypt.format=luks,encrypt.key-secret={node}-key"
    file_node = (
        f"driver=file,node-name={node}-file,filename={option_value(volume.image)},"
        f"discard=unmap{read_only}"
    )
    return [*options, ("blockdev", file_node), ("blockdev", qcow2)]


def volume_args(volume: VolumeDiskSpec) -> list[str]:
    """``-object``/``-blockdev``/``-device`` for one volume: its block nodes
    (:func:`volume_block_nodes`), attached as virtio-blk with the volume's name as its
    serial. On a full host disk the VM pauses (``werror=enospc``) so nothing is lost, and
    QMP ``query-block`` names the volume."""
    node = volume_node_name(volume.name)
    args = [word for option, value in volume_block_nodes(volume) for word in (f"-{option}", value)]
    args += [
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
    if spec.gpu_topology is not None:
        return _gpu_machine_argv(spec, spec.gpu_topology, gpu_accel(accel), binary)
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
        *_bare(spec),
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
        *_guest(spec),
    ]
    for bdf in spec.gpus:
        argv += ["-device", f"vfio-pci,host={bdf}"]
    if spec.incoming_snapshot is not None:
        # QEMU 7.2 has no file: migration transport; exec:cat streams the file in. -S keeps
        # the vCPUs stopped once it is loaded, whatever state the snapshot says.
        argv += ["-S", "-incoming", f"exec:cat {shlex.quote(str(spec.incoming_snapshot))}"]
    return argv


def _bare(spec: VmSpec) -> list[str]:
    return [
        "-name",
        machine_process_name(spec.machine_id),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]


def _channel_args(spec: VmSpec) -> list[str]:
    """The host reads the control port itself (a socket) and acknowledges the exit event."""
    return [EXIT_ACK_ARG] if spec.control_socket is not None else []


def _guest(spec: VmSpec) -> list[str]:
    """Kernel, disks and the console, control, signal and monitor channels."""
    kernel, initrd = spec.boot_files
    argv = [
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        " ".join([GUEST_KERNEL_CMDLINE, *spec.kernel_args, *_channel_args(spec)]),
    ]
    disks = [(spec.root_disk, False, spec.root_disk_format)]
    disks += [(d.path, d.read_only, "raw") for d in spec.extra_disks]
    for index, (path, read_only, disk_format) in enumerate(disks):
        drive = f"id=disk{index},file={option_value(path)},format={disk_format},if=none"
        if read_only:
            drive += ",readonly=on"
        argv += ["-drive", drive, "-device", f"virtio-blk-pci,drive=disk{index}"]
    for volume in spec.volumes:
        argv += volume_args(volume)
    # The console and control channels: sockets the host reads with bounds when the spec has
    # them (QEMU waits at start for the host to take the console, so no output is lost; the
    # host appends to the logs, so a restored guest goes on with those its first boot began),
    # else files QEMU writes itself.
    log_mode = ",append=on" if spec.incoming_snapshot is not None else ""
    console = (
        f"socket,id=console,path={option_value(spec.console_socket)},server=on,wait=on"
        if spec.console_socket is not None
        else f"file,id=console,path={option_value(spec.console_log)}{log_mode}"
    )
    control = (
        f"socket,id=ctl,path={option_value(spec.control_socket)},server=on,wait=off"
        if spec.control_socket is not None
        else f"file,id=ctl,path={option_value(spec.control_log)}{log_mode}"
    )
    argv += [
        "-chardev",
        console,
        "-serial",
        "chardev:console",
        "-device",
        "virtio-serial-pci,id=vs",
        "-chardev",
        control,
        "-device",
        f"virtserialport,bus=vs.0,chardev=ctl,name={Port.CONTROL}",
        "-chardev",
        f"socket,id=sig,path={option_value(spec.signal_socket)},server=on,wait=off",
        "-device",
        f"virtserialport,bus=vs.0,chardev=sig,name={Port.SIGNAL}",
        "-chardev",
        f"socket,id=exec,path={option_value(spec.exec_socket)},server=on,wait=off",
        "-device",
        f"virtserialport,bus=vs.0,chardev=exec,name={Port.EXEC}",
        "-chardev",
        f"socket,id=qmp,path={option_value(spec.qmp_socket)},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if spec.nic is not None:
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={spec.nic.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={spec.nic.mac}",
        ]
    return argv


def _gpu_machine_argv(
    spec: VmSpec, topology: GpuTopology, accel: AccelChoice, binary: str
) -> list[str]:
    memory = topology.memory
    prefix = [TASKSET, "-c", cpu_list(memory.host_cpus)] if memory.host_cpus else []
    argv = [
        *prefix,
        binary,
        *_bare(spec),
        "-machine",
        accel.machine_type,
        "-accel",
        accel.accel,
        "-cpu",
        f"{accel.cpu_model},host-phys-bits=on,host-phys-bits-limit={topology.phys_bits}",
        "-smp",
        str(spec.cpus),
        "-m",
        f"{spec.memory_mb}M",
    ]
    for node in memory.nodes:
        argv += _memory_node(node, topology)
    argv += ["-global", f"q35-pcihost.pci-hole64-size={topology.pci_hole64_bytes // GIB}G"]
    argv += _guest(spec)
    argv += _gpu_devices(topology)
    return argv


def _memory_node(node: MemoryNode, topology: GpuTopology) -> list[str]:
    memory = topology.memory
    backend = f"ram-node{node.guest_node}"
    options = [f"id={backend}", f"size={node.size_mb}M"]
    kind = "memory-backend-ram"
    if memory.page_size != "4K":
        kind = "memory-backend-memfd"
        options += ["hugetlb=on", f"hugetlbsize={memory.page_size}"]
    options += ["prealloc=on", f"prealloc-threads={memory.prealloc_threads}"]
    argv: list[str] = []
    if node.host_node is not None:
        context = f"tc-node{node.guest_node}"
        argv += ["-object", f"thread-context,id={context},node-affinity={node.host_node}"]
        options += [f"prealloc-context={context}", f"host-nodes={node.host_node}", "policy=bind"]
    argv += ["-object", f"{kind}," + ",".join(options)]
    numa = f"node,nodeid={node.guest_node},memdev={backend}"
    if node.vcpus:
        numa += f",cpus={cpu_list(node.vcpus)}"
    return [*argv, "-numa", numa]


def _gpu_devices(topology: GpuTopology) -> list[str]:
    guest_node = {node.host_node: node.guest_node for node in topology.memory.nodes}
    argv: list[str] = []
    for expander, host_node in enumerate(topology.numa_nodes):
        argv += [
            "-device",
            f"pxb-pcie,id=pxb{expander},bus_nr={PXB_BUS_BASE + PXB_BUS_STRIDE * expander},"
            f"numa_node={guest_node.get(host_node, 0)},bus=pcie.0",
        ]
    for index, (expander, gpu) in enumerate(topology.placed()):
        port = f"rp{index}"
        argv += [
            "-device",
            f"pcie-root-port,id={port},bus=pxb{expander},chassis={index + 1},slot=0",
        ]
        device = f"vfio-pci,host={gpu.bdf},id=gpu{index},bus={port},addr=00.0"
        if gpu.companions:
            device += ",multifunction=on"
        argv += ["-device", device]
        for companion in gpu.companions:
            function = companion.rsplit(".", 1)[1]
            argv += [
                "-device",
                f"vfio-pci,host={companion},id=gpu{index}-f{function},bus={port},"
                f"addr=00.{function}",
            ]
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
            "console_log": Path(RunDir.CONSOLE_LOG),
            "control_log": Path(RunDir.CONTROL_LOG),
            "signal_socket": Path(RunDir.SIGNAL_SOCKET),
            "exec_socket": Path(RunDir.EXEC_SOCKET),
            "qmp_socket": Path(RunDir.QMP_SOCKET),
            "vmm_log": Path(RunDir.VMM_LOG),
            "console_socket": spec.console_socket and Path(RunDir.CONSOLE_SOCKET),
            "control_socket": spec.control_socket and Path(RunDir.CONTROL_SOCKET),
            "incoming_snapshot": None,
        }
    )
    return qemu_argv(placeholders, accel, binary="qemu", hugepages_dir=hugepages_dir)
