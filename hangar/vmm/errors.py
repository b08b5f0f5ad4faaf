"""Errors of the VMM layer: :class:`hangar.errors.VmmError`, and one 422 for suspend.

Each carries ``retryable`` in its fields: whether trying the same call again may help.
"""

from __future__ import annotations

from typing import Any

from hangar.errors import Unprocessable, VmmError


class QmpError(VmmError):
    """QMP did not answer (retryable: the monitor may be busy), or answered with an error."""

    code = "qmp_error"


class SignalNotDelivered(VmmError):
    """The VMM did not take a signal line for the guest (the guest is not reading its port)."""

    code = "signal_not_delivered"


class SnapshotUnusable(VmmError):
    """A suspend snapshot that cannot be restored; the caller boots the machine cold.

    ``reason`` is ``missing`` (no whole snapshot: none taken, or one cut short),
    ``corrupt`` (its data does not match its manifest), ``incompatible`` (made for another
    command line, kernel, initrd, disk or QEMU) or ``rejected`` (QEMU could not load it).
    The snapshot has been dropped by the time this is raised.
    """

    code = "snapshot_unusable"

    def __init__(self, message: str, *, reason: str, **fields: Any) -> None:
        super().__init__(message, reason=reason, retryable=False, **fields)
        self.reason = reason


class SuspendFailed(VmmError):
    """Saving the VM did not complete. No snapshot that looks whole is left; ``resumed``
    says whether the guest runs on (it does unless its VMM is gone)."""

    code = "suspend_failed"

    def __init__(self, message: str, *, resumed: bool, **fields: Any) -> None:
        super().__init__(message, resumed=resumed, retryable=resumed, **fields)
        self.resumed = resumed


class SuspendNotSupported(Unprocessable):
    """This VM cannot be suspended (a VFIO device cannot be migrated)."""

    code = "suspend_not_supported"

    def __init__(self, message: str, *, field: str, **fields: Any) -> None:
        super().__init__(message, field=field, retryable=False, **fields)
        self.field = field


class GuestExecError(VmmError):
    """The guest's exec channel did not answer (no channel, or no answer in time)."""

    code = "guest_exec_failed"

    def __init__(self, message: str, *, retryable: bool, **fields: Any) -> None:
        super().__init__(message, retryable=retryable, **fields)
        self.retryable = retryable
