"""VMM drivers: the :class:`Driver` protocol and its QEMU implementation; suspend snapshots
and the guest's exec channel."""

from hangar.vmm.accel import AccelChoice, choose_accel
from hangar.vmm.control import GuestReport, read_control_events, summarise_control_events
from hangar.vmm.driver import (
    DiskSpec,
    Driver,
    StopOutcome,
    VmHandle,
    VmSpec,
    VmStatus,
)
from hangar.vmm.errors import (
    GuestExecError,
    QmpError,
    SignalNotDelivered,
    SnapshotUnusable,
    SuspendFailed,
    SuspendNotSupported,
)
from hangar.vmm.guest_exec import ExecResult, GuestProcess
from hangar.vmm.qemu import QemuDriver, QemuTimeouts
from hangar.vmm.snapshot import SnapshotManifest, drop_snapshot, has_snapshot

__all__ = [
    "AccelChoice",
    "DiskSpec",
    "Driver",
    "ExecResult",
    "GuestExecError",
    "GuestProcess",
    "GuestReport",
    "QemuDriver",
    "QemuTimeouts",
    "QmpError",
    "SignalNotDelivered",
    "SnapshotManifest",
    "SnapshotUnusable",
    "StopOutcome",
    "SuspendFailed",
    "SuspendNotSupported",
    "VmHandle",
    "VmSpec",
    "VmStatus",
    "choose_accel",
    "drop_snapshot",
    "has_snapshot",
    "read_control_events",
    "summarise_control_events",
]
