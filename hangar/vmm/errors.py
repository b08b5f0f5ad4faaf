"""Errors of the VMM layer; all are :class:`hangar.errors.VmmError`."""

from __future__ import annotations

from hangar.errors import VmmError


class QmpError(VmmError):
    """QMP did not answer (retryable: the monitor may be busy), or answered with an error."""

    code = "qmp_error"


class SignalNotDelivered(VmmError):
    """The VMM did not take a signal line for the guest (the guest is not reading its port)."""

    code = "signal_not_delivered"
