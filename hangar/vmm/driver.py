"""The Driver protocol: what the agent asks of any VMM, and the records it keeps about one.

A driver turns a :class:`VmSpec` into a running VM and answers for it through a
:class:`VmHandle`. Specs and handles are pydantic models because the agent stores them
durably: after an agent restart it hands the stored handle back to :meth:`Driver.adopt`.

The guest contract every driver honours (names in :mod:`hangar.model.guest_contract`, which
hangar's guest init reads too):

- kernel command line starts with ``GUEST_KERNEL_CMDLINE``; drivers may append to it;
- disk 1 is the machine's writable root disk (``ROOT_DEVICE``), extra disks follow in order;
- volumes follow the extra disks; the guest finds each by its serial (the volume's name);
- the first serial port goes to ``console_log``;
- the guest writes JSON lines to the port ``Port.CONTROL``, which land in ``control_log``
  (see :mod:`hangar.vmm.control`); with ``console_socket`` and ``control_socket`` set (what
  :meth:`VmSpec.in_run_dir` does) both go through sockets the host reads with bounds
  (:mod:`hangar.vmm.channels`), never straight into files, and the kernel command line
  carries ``EXIT_ACK_ARG`` (the guest waits for the host's answer to its exit event);
- a machine with a :class:`NicSpec` gets one virtio-net device on that tap, with that MAC;
- the host writes ``signal N`` lines to the port ``Port.SIGNAL``, served on
  ``signal_socket``; the guest forwards signal N to its process;
- the host runs commands in the guest through the port ``Port.EXEC``, served on
  ``exec_socket`` (see :mod:`hangar.vmm.guest_exec`).

A running VM can be suspended into a snapshot file (:meth:`Driver.suspend`) and restored
from it by launching the same spec with ``incoming_snapshot`` set (see
:mod:`hangar.vmm.snapshot`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from signal import SIGTERM
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol, Self, runtime_checkable

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from hangar.clock import Clock
from hangar.model.guest_contract import RunDir
from hangar.vmm.container import ContainerSpec
from hangar.vmm.gpu_topology import PCI_BDF_PATTERN, GpuTopology

if TYPE_CHECKING:
    from hangar.vmm.guest_exec import ExecResult, GuestProcess
    from hangar.vmm.snapshot import SnapshotManifest


MACHINE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
IFNAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
MAC_PATTERN = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# A QEMU id that is also a whole virtio-blk serial (20 bytes at most).
VOLUME_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,19}$")
MAX_VOLUMES = 8


class DiskSpec(BaseModel):
    """A disk after the root disk, attached in list order."""

    model_config = ConfigDict(frozen=True)

    path: Path
    read_only: bool = False


def _interface_name(value: str) -> str:
    if not IFNAME_PATTERN.fullmatch(value):
        raise ValueError(f"interface name {value!r} must match {IFNAME_PATTERN.pattern}")
    return value


def _mac(value: str) -> str:
    if not MAC_PATTERN.fullmatch(value):
        raise ValueError(f"MAC {value!r} must be six lower-case hex octets")
    return value


InterfaceName = Annotated[str, AfterValidator(_interface_name)]
MacAddress = Annotated[str, AfterValidator(_mac)]


class NicSpec(BaseModel):
    """The machine's network interface: a tap the host made (``hangar.net``), and the MAC the
    guest's virtio-net device gets (the host's firewall accepts frames only from it). A
    sandbox-tier machine's port is a veth instead, whose other end (``eth0``, with that MAC)
    is in the network namespace ``netns``, which its container joins."""

    model_config = ConfigDict(frozen=True)

    tap: InterfaceName
    mac: MacAddress
    netns: Path | None = Field(
        default=None, description="a sandbox's network namespace (a file under /run/netns)"
    )


class VolumeDiskSpec(BaseModel):
    """A volume: a qcow2 image attached as a virtio-blk disk whose serial is ``name``.

    An encrypted image's passphrase is read by QEMU from ``key_file`` at launch; the driver
    removes that file once QEMU has started (or failed to), so it never outlives the launch.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    image: Path
    key_file: Path | None = None
    read_only: bool = False

    @field_validator("name")
    @classmethod
    def _name_is_a_serial(cls, value: str) -> str:
        if not VOLUME_NAME_PATTERN.fullmatch(value):
            raise ValueError(f"volume name {value!r} must match {VOLUME_NAME_PATTERN.pattern}")
        return value


class VmSpec(BaseModel):
    """Everything a driver needs to boot one machine; paths are on the host.

    A VM (tier ``vm``) has a ``kernel`` and ``initrd``; a sandbox-tier machine has a
    ``container`` instead, and its ``root_disk`` is the root folder the container runs in.
    """

    model_config = ConfigDict(frozen=True)

    machine_id: str
    run_dir: Path
    kernel: Path | None = None
    initrd: Path | None = None
    root_disk: Path
    root_disk_format: Literal["raw", "qcow2"] = Field(
        default="raw", description="qcow2: an overlay over a cached image (the machines' own)"
    )
    container: ContainerSpec | None = Field(
        default=None, description="a sandbox-tier machine: the container it runs"
    )
    extra_disks: list[DiskSpec] = Field(default_factory=list)
    volumes: list[VolumeDiskSpec] = Field(default_factory=list, max_length=MAX_VOLUMES)
    cpus: int = Field(default=1, ge=1, le=512)
    memory_mb: int = Field(default=256, ge=32)
    kernel_args: list[str] = Field(
        default_factory=list, description="appended to the contract's GUEST_KERNEL_CMDLINE"
    )
    console_log: Path
    control_log: Path
    signal_socket: Path
    exec_socket: Path
    qmp_socket: Path
    vmm_log: Path = Field(description="the VMM's own stderr, quoted in launch errors")
    console_socket: Path | None = Field(
        default=None,
        description="the console as a socket the host reads with bounds (None: QEMU writes "
        "console_log itself)",
    )
    control_socket: Path | None = Field(
        default=None, description="the control port as a socket the host reads with bounds"
    )
    gpus: list[str] = Field(
        default_factory=list,
        description="PCI BDFs passed through by VFIO on the root bus (the older flat layout; "
        "GPU machines use gpu_topology)",
    )
    hugepages: bool = False
    nic: NicSpec | None = Field(default=None, description="no network interface when None")
    gpu_topology: GpuTopology | None = Field(
        default=None,
        description="a GPU machine: q35 with KVM, a pxb-pcie per NUMA node and a root port "
        "per GPU, a 64-bit PCI hole sized to the BARs, memory from huge pages on the GPUs' node",
    )
    incoming_snapshot: Path | None = Field(
        default=None,
        description="restore the VM from this suspend snapshot instead of booting it; "
        "every other field must be as it was when the snapshot was taken",
    )

    @field_validator("machine_id")
    @classmethod
    def _machine_id_is_a_plain_name(cls, value: str) -> str:
        if not MACHINE_ID_PATTERN.fullmatch(value):
            raise ValueError(f"machine_id {value!r} must match {MACHINE_ID_PATTERN.pattern}")
        return value

    @field_validator("gpus")
    @classmethod
    def _gpus_are_full_bdfs(cls, value: list[str]) -> list[str]:
        for bdf in value:
            if not PCI_BDF_PATTERN.fullmatch(bdf):
                raise ValueError(f"GPU {bdf!r} is not a PCI address like 0000:65:00.0")
        if len(set(value)) != len(value):
            raise ValueError("a GPU is listed twice")
        return value

    @model_validator(mode="after")
    def _a_vm_or_a_container(self) -> VmSpec:
        if self.container is None and (self.kernel is None or self.initrd is None):
            raise ValueError("a VM needs a kernel and an initrd")
        if self.container is not None and (
            self.kernel is not None or self.gpus or self.gpu_topology
        ):
            raise ValueError("a container has no kernel or PCI GPUs of its own")
        if self.nic is not None and (self.container is not None) != (self.nic.netns is not None):
            raise ValueError("a container's NIC is a network namespace; a VM's is a tap alone")
        return self

    @property
    def boot_files(self) -> tuple[Path, Path]:
        """The VM's kernel and initrd."""
        if self.kernel is None or self.initrd is None:
            raise ValueError(f"machine {self.machine_id} is a container: it has no kernel")
        return self.kernel, self.initrd

    @model_validator(mode="after")
    def _one_gpu_layout(self) -> VmSpec:
        if self.gpu_topology is not None:
            if self.gpus or self.hugepages:
                raise ValueError("gpu_topology replaces gpus and hugepages: give one or the other")
            if self.gpu_topology.memory.memory_mb != self.memory_mb:
                raise ValueError(
                    f"gpu_topology plans {self.gpu_topology.memory.memory_mb} MiB of memory, "
                    f"the spec has {self.memory_mb} MiB"
                )
            vcpus = sum(len(node.vcpus) for node in self.gpu_topology.memory.nodes)
            if vcpus != self.cpus:
                raise ValueError(f"gpu_topology places {vcpus} vCPUs, the spec has {self.cpus}")
        return self

    @field_validator("volumes")
    @classmethod
    def _volumes_are_distinct(cls, value: list[VolumeDiskSpec]) -> list[VolumeDiskSpec]:
        if len({volume.name for volume in value}) != len(value):
            raise ValueError("a volume is listed twice")
        return value

    @field_validator("kernel_args")
    @classmethod
    def _kernel_args_are_single_words(cls, value: list[str]) -> list[str]:
        for arg in value:
            if not arg or any(ch.isspace() or not ch.isprintable() for ch in arg):
                raise ValueError(f"kernel argument {arg!r} must be one printable word")
        return value

    @classmethod
    def in_run_dir(
        cls,
        *,
        machine_id: str,
        run_dir: Path,
        kernel: Path | None,
        initrd: Path | None,
        root_disk: Path,
        root_disk_format: Literal["raw", "qcow2"] | None = None,
        extra_disks: list[DiskSpec] | None = None,
        volumes: list[VolumeDiskSpec] | None = None,
        cpus: int = 1,
        memory_mb: int = 256,
        kernel_args: list[str] | None = None,
        gpus: list[str] | None = None,
        hugepages: bool = False,
        nic: NicSpec | None = None,
        gpu_topology: GpuTopology | None = None,
        channel_sockets: bool = True,
        container: ContainerSpec | None = None,
    ) -> Self:
        """A spec whose logs and sockets sit in ``run_dir`` under their standard names; the
        root disk's format is its suffix's (``.qcow2``, else raw) unless given."""
        return cls(
            machine_id=machine_id,
            run_dir=run_dir,
            kernel=kernel,
            initrd=initrd,
            root_disk=root_disk,
            root_disk_format=root_disk_format
            or ("qcow2" if root_disk.suffix == ".qcow2" else "raw"),
            extra_disks=extra_disks or [],
            volumes=volumes or [],
            cpus=cpus,
            memory_mb=memory_mb,
            kernel_args=kernel_args or [],
            console_log=run_dir / RunDir.CONSOLE_LOG,
            control_log=run_dir / RunDir.CONTROL_LOG,
            signal_socket=run_dir / RunDir.SIGNAL_SOCKET,
            exec_socket=run_dir / RunDir.EXEC_SOCKET,
            qmp_socket=run_dir / RunDir.QMP_SOCKET,
            vmm_log=run_dir / RunDir.VMM_LOG,
            console_socket=run_dir / RunDir.CONSOLE_SOCKET if channel_sockets else None,
            control_socket=run_dir / RunDir.CONTROL_SOCKET if channel_sockets else None,
            gpus=gpus or [],
            hugepages=hugepages,
            nic=nic,
            gpu_topology=gpu_topology,
            container=container,
        )


class VmHandle(BaseModel):
    """What the agent stores about a launched VM to find it again after a restart."""

    model_config = ConfigDict(frozen=True)

    driver: str
    machine_id: str
    pid: int
    start_time: int = Field(description="/proc/PID/stat field 22; tells a reused pid apart")
    qmp_socket: Path
    signal_socket: Path
    control_log: Path
    console_log: Path
    vmm_log: Path
    console_socket: Path | None = None
    control_socket: Path | None = None
    accel: str
    machine_type: str
    memory_mb: int | None = Field(
        default=None, description="guest memory: how long a teardown may take grows with it"
    )
    cpu_model: str = ""
    exec_socket: Path | None = Field(
        default=None, description="None for a VM launched without an exec channel"
    )
    spec: VmSpec | None = Field(
        default=None,
        description="the spec the VM runs (without incoming_snapshot): what suspend records",
    )

    @classmethod
    def of(
        cls, launched: VmSpec, /, *, driver: str, pid: int, start_time: int, **more: Any
    ) -> VmHandle:
        """The handle of a VMM just started for ``launched``: its paths and size from the spec,
        what the driver knows besides in ``more``."""
        return cls(
            driver=driver,
            machine_id=launched.machine_id,
            pid=pid,
            start_time=start_time,
            qmp_socket=launched.qmp_socket,
            signal_socket=launched.signal_socket,
            control_log=launched.control_log,
            console_log=launched.console_log,
            vmm_log=launched.vmm_log,
            memory_mb=launched.memory_mb,
            **more,
        )


class VmStatus(BaseModel):
    state: Literal["running", "exited"]
    guest_ready: bool = False
    exit_code: int | None = Field(default=None, description="as reported by the guest")
    error: str | None = None
    vmm_exit_status: int | None = Field(
        default=None,
        description="the VMM process's own status (negative: killed by that signal); "
        "known only for a VMM this driver instance launched",
    )
    vm_state: str | None = Field(
        default=None, description="the VMM's view of the VM (QMP query-status), when it answered"
    )


class StopOutcome(StrEnum):
    NOT_RUNNING = "not_running"
    GUEST_EXITED = "guest_exited"
    QUIT = "quit"
    KILLED = "killed"


@runtime_checkable
class Driver(Protocol):
    """A VMM as the agent sees it. Implementations: :class:`hangar.vmm.qemu.QemuDriver`
    (VMs) and :class:`hangar.vmm.sandbox.SandboxDriver` (sandbox-tier containers)."""

    name: str

    def prepare(self, spec: VmSpec) -> list[str]:
        """Check the spec's input files and return the command line ``launch`` would run."""
        ...

    async def launch(self, spec: VmSpec) -> VmHandle:
        """Start the VMM, detached from the caller's session; return once it answers.

        With ``spec.incoming_snapshot`` the VM is restored from that snapshot and runs on
        where it was suspended; the snapshot is consumed (dropped before the guest runs
        again). A snapshot that is missing, corrupt or made for another command line raises
        :class:`hangar.vmm.errors.SnapshotUnusable` and is dropped: launch the spec without
        ``incoming_snapshot`` to boot cold.
        """
        ...

    async def signal(self, handle: VmHandle, signum: int) -> None:
        """Ask the guest to deliver ``signum`` to its process."""
        ...

    async def stop(
        self, handle: VmHandle, timeout_s: float, clock: Clock, signum: int = SIGTERM
    ) -> StopOutcome:
        """Signal the guest; after ``timeout_s`` make the VMM quit, and failing that kill it."""
        ...

    async def kill(self, handle: VmHandle) -> None:
        """SIGKILL the VMM if the handle still names a live one; return once it is gone."""
        ...

    async def status(self, handle: VmHandle) -> VmStatus: ...

    def is_running(self, handle: VmHandle) -> bool:
        """Is the handle's process still alive? Cheap (no monitor round trip): for polling."""
        ...

    async def adopt(self, handle: VmHandle) -> bool:
        """After an agent restart: is this handle's VMM still running, ours, and answering?"""
        ...

    async def suspend(self, handle: VmHandle, snapshot_path: Path) -> SnapshotManifest:
        """Pause the guest, save its memory and device state to ``snapshot_path`` and end
        the VMM. The root disk is left exactly as the guest had it.

        Idempotent: a whole snapshot already there (with its VMM still paused, or gone) is
        kept and its VMM ended. On failure nothing that looks whole is left and the guest
        runs on. GPU machines raise :class:`hangar.vmm.errors.SuspendNotSupported`.
        """
        ...

    async def exec(
        self, handle: VmHandle, argv: Sequence[str], *, stdin: bytes = b"", timeout_s: float
    ) -> ExecResult:
        """Run ``argv`` in the guest's root as root; killed after ``timeout_s``."""
        ...

    async def processes(self, handle: VmHandle) -> list[GuestProcess]:
        """The processes running in the guest's root."""
        ...
