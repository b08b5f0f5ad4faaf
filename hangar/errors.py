"""Errors raised across hangar.

Every error carries structured fields; the API maps each class to one HTTP status
and a Fly-shaped body ``{"error": message, "status": code}``.

Hierarchy::

    HangarError                     base; ``code`` is a short machine-readable string
     +-- InvalidRequest             400  a request that cannot be parsed or is contradictory
     +-- Unauthenticated            401  no token, or one unknown, expired or revoked
     +-- Forbidden                  403  a valid token without the right
     +-- Unprocessable              422  a well-formed request naming a field hangar rejects
     |    +-- UnsupportedField      422  a field hangar cannot honour yet
     |    +-- InsufficientCapacity  422  no host can take the machine (names region and kind)
     |    +-- QuotaExceeded         422  the org would pass one of its quotas (names it)
     +-- NotFound                   404  app, machine, host or lease that does not exist
 |    +-- ModelNotFound         404  a model (deployment) absent or not the caller's
     +-- Conflict                   409  a state or lease conflict (illegal transition, wrong nonce)
     |    +-- NameTaken             409  a unique name in use (``name_taken``, as Fly answers)
     +-- PreconditionFailed         412  an ``If-Match``-style check failed (version, lease owner)
     +-- WaitTimeout                408  ``wait`` ran out before the machine reached the state
     +-- RequestTooLarge            413  a body over the size limit
     +-- RateLimited                429  past the rate limit (carries ``retry_after_s``)
     +-- ServiceUnavailable         503  no machine (or model replica) can take a request now
     +-- BadGateway                 502  an upstream (a model replica) failed or answered badly
     +-- ImageError                 failed to pull or unpack an image (recorded on the machine)
     +-- GuestBootError             failed to build or boot the guest (recorded on the machine)
     +-- VmmError                   the VMM misbehaved: launch failure, QMP failure
     +-- DeviceError                sysfs / VFIO / reset failure on a host device
     +-- NetworkError               netlink / nftables / address plan failure on a host network
     +-- VolumeError                a volume image, key or snapshot operation failed on the host
     +-- StoreError                 the store could not commit (retryable by callers)
     |    +-- StoreUnavailable      503  the store cannot be reached or has no quorum
     |    +-- StoreRejected         the store refused a request as malformed (not retryable)
     +-- SealedValueError           a sealed (encrypted) value failed to open: wrong key, tampered
     +-- EngineError                the model engine (llama-server) could not be fetched or built

An error says whether trying again may help (``retryable``: a store that was busy, a monitor
that timed out, a registry that did not answer), so the agent's engine retries it a bounded
number of times before it rolls a run back; anything else aborts at once. The HTTP statuses
and their Fly ``status`` codes are one table, :data:`HTTP_STATUS_CODES`.
"""

from __future__ import annotations

from typing import Any


class HangarError(Exception):
    """Base of all hangar errors. ``fields`` holds structured context for logs and events."""

    http_status: int = 500
    code: str = "internal_error"
    retryable: bool = False
    """Class default: whether the same call may succeed if tried again."""

    def __init__(self, message: str, *, retryable: bool | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message


class InvalidRequest(HangarError):
    http_status = 400
    code = "invalid_request"


class Unprocessable(HangarError):
    http_status = 422
    code = "unprocessable_entity"


class UnsupportedField(Unprocessable):
    code = "unsupported_field"

    def __init__(self, field: str, reason: str = "is not supported by hangar yet") -> None:
        super().__init__(f"{field} {reason}", field=field)
        self.field = field


class InsufficientCapacity(Unprocessable):
    code = "insufficient_capacity"


class NotFound(HangarError):
    http_status = 404
    code = "not_found"


class Conflict(HangarError):
    http_status = 409
    code = "conflict"


class NameTaken(Conflict):
    """A name that must be unique is taken (app names are global, as on Fly)."""

    code = "name_taken"


class PreconditionFailed(HangarError):
    http_status = 412
    code = "failed_precondition"


class WaitTimeout(HangarError):
    http_status = 408
    code = "deadline_exceeded"


class ImageError(HangarError):
    code = "image_error"


class GuestBootError(HangarError):
    code = "guest_boot_error"


class VmmError(HangarError):
    code = "vmm_error"


class DeviceError(HangarError):
    code = "device_error"

    def __init__(self, message: str, *, retryable: bool | None = None, **fields: Any) -> None:
        """The ``retry`` field, when given, says whether to retry: a field survives the JSON
        a device worker answers with (``hangar.devices.worker``)."""
        if retryable is None and "retry" in fields:
            retryable = bool(fields["retry"])
        super().__init__(message, retryable=retryable, **fields)


class NetworkError(HangarError):
    """A host network operation failed (``retryable`` says whether running it again may help),
    or the address plan cannot place a machine (an exhausted range, a collision)."""

    code = "network_error"

    def __init__(self, message: str, *, retryable: bool, **fields: Any) -> None:
        super().__init__(message, retryable=retryable, **fields)


class VolumeError(HangarError):
    """A volume operation failed on the host (``qemu-img``, the key store, the disk).

    ``retryable`` says whether running the same operation again may succeed (a full disk,
    a busy image) or not (a corrupt image, a missing key)."""

    code = "volume_error"

    def __init__(self, message: str, *, retryable: bool, **fields: Any) -> None:
        super().__init__(message, retryable=retryable, **fields)


class StoreError(HangarError):
    code = "store_error"
    retryable = True


class StoreUnavailable(StoreError):
    """The store cannot be reached or has lost quorum. Nothing is half done: a write either
    did not happen (``outcome_unknown`` false) or is one atomic transaction that may still
    commit when quorum returns (``outcome_unknown`` true; compare-and-set writes can be checked
    by reading the key back)."""

    http_status = 503
    code = "store_unavailable"

    def __init__(self, message: str, *, outcome_unknown: bool = False, **fields: Any) -> None:
        super().__init__(message, outcome_unknown=outcome_unknown, **fields)
        self.outcome_unknown = outcome_unknown


class StoreRejected(StoreError):
    """The store refused a request (too large, malformed, a compacted revision): retrying the
    same request fails the same way."""

    retryable = False
    code = "store_rejected"


class SealedValueError(HangarError):
    """A sealed value did not open: written under another key, for another place, or altered."""

    code = "sealed_value_invalid"


class Unauthenticated(HangarError):
    """No token, or one that is unknown, expired or revoked."""

    http_status = 401
    code = "unauthenticated"


class Forbidden(HangarError):
    """A valid token without the right: read-only on a write, another app, not an operator."""

    http_status = 403
    code = "forbidden"


class RateLimited(HangarError):
    http_status = 429
    code = "rate_limited"
    retryable = True

    def __init__(self, message: str, retry_after_s: float, **fields: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **fields)
        self.retry_after_s = retry_after_s


class RequestTimeout(HangarError):
    """The client took too long to send its request."""

    http_status = 408
    code = "request_timeout"


class RequestTooLarge(HangarError):
    http_status = 413
    code = "request_too_large"


class QuotaExceeded(Unprocessable):
    """Creating or growing a machine would take its org past one of its quotas."""

    code = "quota_exceeded"

    def __init__(self, message: str, quota: str, **fields: Any) -> None:
        super().__init__(message, quota=quota, **fields)
        self.quota = quota


class ServiceUnavailable(HangarError):
    """No machine of an app can take a request now: every one is past its hard limit and the
    queue is full or timed out, none is started, or a wake did not finish in time. Retryable."""

    http_status = 503
    code = "service_unavailable"

    def __init__(
        self,
        message: str,
        app: str,
        reason: str,
        *,
        retry_after_s: float | None = None,
        **fields: Any,
    ) -> None:
        if retry_after_s is not None:
            fields["retry_after_s"] = retry_after_s
        super().__init__(message, app=app, reason=reason, retryable=True, **fields)
        self.app = app
        self.reason = reason
        self.retry_after_s = retry_after_s


class BadGateway(HangarError):
    """An upstream hangar forwarded to (a model replica) failed or broke off its answer."""

    http_status = 502
    code = "bad_gateway"


class EngineError(HangarError):
    code = "engine_error"


class ModelNotFound(NotFound):
    """The one answer for a model that is absent, another org's, or outside the caller's key."""

    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            model=model,
            param="model",
        )


HTTP_STATUS_CODES: dict[int, str] = {
    **{
        cls.http_status: cls.code
        for cls in (
            InvalidRequest,
            Unauthenticated,
            Forbidden,
            NotFound,
            Conflict,
            PreconditionFailed,
            WaitTimeout,
            RequestTooLarge,
            Unprocessable,
            RateLimited,
            ServiceUnavailable,
            BadGateway,
        )
    },
    405: "method_not_allowed",
    415: "unsupported_media_type",
    500: HangarError.code,
}
"""HTTP status -> the ``status`` code of a Fly-shaped error body, for every status hangar sends."""
