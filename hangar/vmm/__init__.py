"""VMM drivers: the :class:`Driver` protocol and its QEMU implementation."""

from hangar.vmm.accel import AccelChoice, choose_accel
from hangar.vmm.control import GuestReport, read_control_events, summarise_control_events
from hangar.vmm.driver import (
    CONTROL_PORT_NAME,
    GUEST_KERNEL_CMDLINE,
    SIGNAL_PORT_NAME,
    DiskSpec,
    Driver,
    StopOutcome,
    VmHandle,
    VmSpec,
    VmStatus,
)
from hangar.vmm.errors import QmpError, SignalNotDelivered
from hangar.vmm.qemu import QemuDriver, QemuTimeouts

__all__ = [
    "CONTROL_PORT_NAME",
    "GUEST_KERNEL_CMDLINE",
    "SIGNAL_PORT_NAME",
    "AccelChoice",
    "DiskSpec",
    "Driver",
    "GuestReport",
    "QemuDriver",
    "QemuTimeouts",
    "QmpError",
    "SignalNotDelivered",
    "StopOutcome",
    "VmHandle",
    "VmSpec",
    "VmStatus",
    "choose_accel",
    "read_control_events",
    "summarise_control_events",
]
