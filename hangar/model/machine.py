"""Machines, their states, events and leases, shaped as Fly's Machines API returns them."""

from __future__ import annotations

import enum
import os
import secrets
import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from hangar.model.config import MachineConfig
from hangar.model.services import CheckStatus


class MachineState(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    STOPPED = "stopped"
    REPLACING = "replacing"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    """Its memory and devices saved to a file, its root disk kept, no VMM running and no
    host resources held; ``start`` restores it where it was."""
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    LAUNCH_FAILED = "launch_failed"

    @property
    def holds_resources(self) -> bool:
        """A VMM may run and host resources (claims, GPUs) may be held in this state; it is
        also where ``stop`` and ``destroy`` without ``force`` do not apply directly."""
        return self in HOLDS_RESOURCES

    @property
    def startable(self) -> bool:
        return self in STARTABLE_STATES

    @property
    def terminal(self) -> bool:
        return self is MachineState.DESTROYED

    @property
    def may_still_log(self) -> bool:
        """The console may still grow: the machine runs or may yet boot."""
        return self in HOLDS_RESOURCES or self is MachineState.CREATED


HOLDS_RESOURCES = frozenset(
    {
        MachineState.STARTING,
        MachineState.STARTED,
        MachineState.STOPPING,
        MachineState.REPLACING,
        MachineState.SUSPENDING,
    }
)
STARTABLE_STATES = frozenset(
    {
        MachineState.CREATED,
        MachineState.STOPPED,
        MachineState.FAILED,
        MachineState.LAUNCH_FAILED,
        MachineState.SUSPENDED,
    }
)
STOPPABLE_STATES = HOLDS_RESOURCES | {MachineState.SUSPENDED}
"""``stop`` applies: a VMM may run, or a suspended machine's snapshot is dropped."""
WAITABLE_STATES = frozenset(
    {
        MachineState.STARTED,
        MachineState.STOPPED,
        MachineState.SUSPENDED,
        MachineState.DESTROYED,
        MachineState.FAILED,
    }
)
"""States ``wait`` accepts."""


class ImageRef(BaseModel):
    registry: str = ""
    repository: str = ""
    tag: str = ""
    digest: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class MachineEvent(BaseModel):
    """One event as stored; ``hangar.api.schemas.fly_event`` is what goes on the wire."""

    id: str
    type: str
    status: str
    source: str
    timestamp: int
    """Unix milliseconds."""
    request: dict[str, Any] | None = None
    """As Fly carries it: only an exit's ``{exit_event, restart_count}``."""
    reason: str = ""
    """Why, in words (a failure, a snapshot that could not be restored); empty for none."""


HOST_SOURCE = "flyd"
"""Events of what the host did (Fly calls its host orchestrator flyd)."""
USER_SOURCE = "user"
"""Events of what a request asked for."""


def new_event(
    event_type: str,
    status: str,
    source: str,
    now: float,
    *,
    request: dict[str, Any] | None = None,
    reason: str = "",
) -> MachineEvent:
    return MachineEvent(
        id=new_event_id(),
        type=event_type,
        status=status,
        source=source,
        timestamp=int(now * 1000),
        request=request,
        reason=reason,
    )


def host_event(
    event_type: str,
    status: str,
    now: float,
    *,
    request: dict[str, Any] | None = None,
    reason: str = "",
) -> MachineEvent:
    return new_event(event_type, status, HOST_SOURCE, now, request=request, reason=reason)


def user_event(event_type: str, status: str, now: float, *, reason: str = "") -> MachineEvent:
    return new_event(event_type, status, USER_SOURCE, now, reason=reason)


def rfc3339(timestamp: float) -> str:
    """A Unix time as RFC 3339 in UTC with milliseconds (``2026-01-02T03:04:05.678Z``), as
    Go's ``time.Time`` decodes it."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Lease(BaseModel):
    nonce: str
    expires_at: int
    owner: str
    description: str = ""
    version: str


class Machine(BaseModel):
    id: str
    name: str
    app: str
    app_id: str = ""
    """The app instance the machine belongs to (an app name may be deleted and reused)."""
    state: MachineState
    region: str
    instance_id: str
    version: int
    config: MachineConfig
    image_ref: ImageRef = Field(default_factory=ImageRef)
    private_ip: str = ""
    created_at: float
    updated_at: float
    host_id: str = ""
    failure_reason: str = ""
    cordoned: bool = False
    """Out of the proxy's rotation (``cordon``), running as before."""
    checks: list[CheckStatus] = Field(default_factory=list)
    """The latest result of each of its health checks."""
    skip_secrets: bool = False
    """Boots without its app's secrets (created or updated with ``skip_secrets``)."""


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_machine_id() -> str:
    return secrets.token_hex(7)


def new_event_id() -> str:
    return new_ulid()


def new_ulid(now: float | None = None) -> str:
    """A ULID: 48-bit millisecond time then 80 random bits, Crockford base32, sortable by time."""
    milliseconds = int((time.time() if now is None else now) * 1000)
    value = (milliseconds << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))
