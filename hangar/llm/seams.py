"""What the model gateway needs from the rest of hangar, as narrow typed seams.

The gateway knows nothing of machines, stores or tokens' storage: it asks an ``Authenticator``
who a bearer token is, ``Deployments`` which models an org has, ``Replicas`` where a
deployment's replicas are and to wake, suspend or add one, and tells ``Metering`` the tokens
each request used. hangar wires these to its store and agent; tests wire them to real
``llama-server`` processes on loopback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: an org, and with a per-deployment API key, that deployment
    only (its ``deployment`` is the deployment's ``id``)."""

    org: str
    token_id: str
    deployment: str | None = None


@dataclass(frozen=True)
class Deployment:
    """A model served under ``name`` (what clients send as ``model``) within ``org``."""

    id: str
    org: str
    name: str
    app: str = ""  # the app whose machines are the replicas
    min_replicas: int = 0
    max_replicas: int = 1
    concurrency: int = 4  # requests one replica serves at once (llama-server's --parallel)
    created_at: int = 0  # seconds since the epoch, shown by /v1/models


class ReplicaState(StrEnum):
    STARTED = "started"  # running; serves once its health endpoint answers
    STARTING = "starting"  # being brought up by someone else: wait, do not wake
    SUSPENDED = "suspended"  # memory kept; waking resumes it (fast)
    STOPPED = "stopped"  # not running; waking starts it (slow)


@dataclass(frozen=True)
class Replica:
    """One instance of a deployment's engine, reachable at ``address`` (``http://HOST:PORT``)."""

    id: str
    deployment: str
    address: str
    state: ReplicaState


@dataclass(frozen=True)
class Usage:
    """Tokens one request used, as the engine reported them."""

    org: str
    deployment: str
    token_id: str
    endpoint: str  # "chat.completions", "completions" or "embeddings"
    prompt_tokens: int
    completion_tokens: int
    at: float  # seconds since the epoch


class Authenticator(Protocol):
    async def authenticate(self, token: str) -> Caller | None:
        """The caller a bearer token (org token or per-deployment API key) stands for, or
        None when it is unknown, expired or revoked."""
        ...


class Deployments(Protocol):
    async def of_org(self, org: str) -> Sequence[Deployment]:
        """The org's deployments; nothing of any other org."""
        ...

    async def all(self) -> Sequence[Deployment]:
        """Every deployment this gateway serves (for idle suspension and scaling in)."""
        ...


class Replicas(Protocol):
    async def list(self, deployment: Deployment) -> Sequence[Replica]:
        """The deployment's replicas as they are now."""
        ...

    async def wake(self, replica: Replica) -> Replica:
        """Resume a suspended replica or start a stopped one; return it as it is now (its
        address may have changed). Raises ``ServiceUnavailable`` or ``InsufficientCapacity`` when
        the host cannot take it now, another ``HangarError`` when it fails."""
        ...

    async def sleep(self, replica: Replica) -> None:
        """Suspend an idle replica (or stop it where suspending is not possible)."""
        ...

    async def scale_out(self, deployment: Deployment) -> Replica:
        """Add one replica (started, or stopped for ``wake`` to start). Raises
        ``ServiceUnavailable`` or ``InsufficientCapacity`` when there is no room for one."""
        ...


class Metering(Protocol):
    async def record(self, usage: Usage) -> None:
        """Count the tokens of one served request against its org and deployment."""
        ...
