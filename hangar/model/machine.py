"""Machines, their states, events and leases, shaped as Fly's Machines API returns them."""

from __future__ import annotations

import enum
import os
import secrets
import time
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
    {MachineState.STARTING, MachineState.STARTED, MachineState.STOPPING, MachineState.REPLACING}
)
STARTABLE_STATES = frozenset(
    {MachineState.CREATED, MachineState.STOPPED, MachineState.FAILED, MachineState.LAUNCH_FAILED}
)
WAITABLE_STATES = frozenset(
    {MachineState.STARTED, MachineState.STOPPED, MachineState.DESTROYED, MachineState.FAILED}
)
"""States ``wait`` accepts."""


class ImageRef(BaseModel):
    registry: str = ""
    repository: str = ""
    tag: str = ""
    digest: str = ""
    labels: dict[str, str] = Field(default_factory=dict)


class MachineEvent(BaseModel):
    id: str
    type: str
    status: str
    source: str
    timestamp: int
    """Unix milliseconds."""
    request: dict[str, Any] = Field(default_factory=dict)


HOST_SOURCE = "flyd"
"""Events of what the host did (Fly calls its host orchestrator flyd)."""
USER_SOURCE = "user"
"""Events of what a request asked for."""


def new_event(
    event_type: str, status: str, source: str, now: float, request: dict[str, Any] | None = None
) -> MachineEvent:
    return MachineEvent(
        id=new_event_id(),
        type=event_type,
        status=status,
        source=source,
        timestamp=int(now * 1000),
        request=request or {},
    )


def host_event(
    event_type: str, status: str, now: float, request: dict[str, Any] | None = None
) -> MachineEvent:
    return new_event(event_type, status, HOST_SOURCE, now, request)


def user_event(
    event_type: str, status: str, now: float, request: dict[str, Any] | None = None
) -> MachineEvent:
    return new_event(event_type, status, USER_SOURCE, now, request)


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
