"""Durable runs: what an operation was asked to do (a typed request), and how far it got.

Each operation's request is a typed value, stored with its run as JSON; an unknown key or a
wrong type is refused when the run is submitted, never discovered half-way through it. The
agent builds the run's plan from the request (``hangar.agent.operations.plan_for``), so a run
resumed after a crash gets the same steps with the same inputs. What steps learn on the way
(an exit code, a decision) is kept in the run's typed :class:`RunProgress`.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hangar.model.config import MachineConfig
from hangar.model.duration import MAX_CONFIG_DURATION_S


class OperationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateRequest(OperationRequest):
    """Boot a machine just created: resolve its image afresh, then start it."""

    operation: Literal["create"] = "create"


class PrepareRequest(OperationRequest):
    """``skip_launch``: resolve the image (so a bad reference fails at create), no boot."""

    operation: Literal["prepare"] = "prepare"


class StartRequest(OperationRequest):
    operation: Literal["start"] = "start"


class StopRequest(OperationRequest):
    """Stop the guest: ``signal`` first, then after ``timeout_s`` make the VMM quit (both
    default to the machine's ``stop_config``)."""

    operation: Literal["stop"] = "stop"
    signal: int | None = Field(default=None, ge=1, le=64)
    timeout_s: float | None = Field(default=None, ge=0, le=MAX_CONFIG_DURATION_S)


class RestartRequest(OperationRequest):
    """Stop and boot again on the same host resources (GPUs are kept, not handed off);
    ``signal`` and ``timeout_s`` as for a stop."""

    operation: Literal["restart"] = "restart"
    signal: int | None = Field(default=None, ge=1, le=64)
    timeout_s: float | None = Field(default=None, ge=0, le=MAX_CONFIG_DURATION_S)


class SuspendRequest(OperationRequest):
    """Save the guest's memory and devices into the machine's snapshot file and end its VMM,
    keeping its root disk; its host resources are freed. ``start`` restores it."""

    operation: Literal["suspend"] = "suspend"


class UpdateRequest(OperationRequest):
    """Make ``config`` the machine's version ``version``; boot it again if ``relaunch``.
    ``metadata_before``: the machine's metadata when the update was asked for; what the
    metadata endpoints change after that is kept when ``config`` is applied."""

    operation: Literal["update"] = "update"
    config: MachineConfig
    version: int = Field(ge=2)
    instance_id: str = Field(min_length=1, max_length=64)
    relaunch: bool
    metadata_before: dict[str, str] | None = None


class ExitRequest(OperationRequest):
    """The guest ended on its own: record how, free what it held, apply the restart policy."""

    operation: Literal["exit"] = "exit"


class DestroyRequest(OperationRequest):
    """``force`` stops a running guest without waiting for it."""

    operation: Literal["destroy"] = "destroy"
    force: bool = False


VOLUME_SUBJECT_PREFIX = "vol:"
"""A volume's runs have ``vol:VOLUME_ID`` for subject, as a GPU handoff has ``gpu:BDF``."""


def volume_subject(volume_id: str) -> str:
    return f"{VOLUME_SUBJECT_PREFIX}{volume_id}"


class VolumeCreateRequest(OperationRequest):
    """Make the volume's image (and key, when encrypted): blank, restored from
    ``snapshot_id`` of ``source_volume_id``, or a fork of ``source_volume_id`` as it is now."""

    operation: Literal["volume_create"] = "volume_create"
    size_gb: int = Field(ge=1)
    encrypted: bool
    fstype: Literal["ext4"] = "ext4"
    source_volume_id: str | None = None
    snapshot_id: str | None = None


class VolumeExtendRequest(OperationRequest):
    """Grow the volume to ``size_gb`` (through QEMU while a running machine has it open)."""

    operation: Literal["volume_extend"] = "volume_extend"
    size_gb: int = Field(ge=1)


class VolumeSnapshotRequest(OperationRequest):
    """Take snapshot ``snapshot_id`` (``scheduled``: by the daily schedule)."""

    operation: Literal["volume_snapshot"] = "volume_snapshot"
    snapshot_id: str
    scheduled: bool = False


class VolumeDeleteSnapshotRequest(OperationRequest):
    """Remove snapshot ``snapshot_id`` (past its retention)."""

    operation: Literal["volume_delete_snapshot"] = "volume_delete_snapshot"
    snapshot_id: str


class VolumeDeleteRequest(OperationRequest):
    """Delete the volume: its key (the data is unreadable from then on), then its image."""

    operation: Literal["volume_delete"] = "volume_delete"


class HandoffRequest(OperationRequest):
    """Make a released GPU's whole IOMMU group clean before it is free: scrubbed, its
    settings and health checked, back on its host drivers. ``bdf`` is the group's first GPU."""

    operation: Literal["handoff"] = "handoff"
    bdf: str = Field(pattern=r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


RunRequest = Annotated[
    CreateRequest
    | PrepareRequest
    | StartRequest
    | StopRequest
    | RestartRequest
    | SuspendRequest
    | UpdateRequest
    | ExitRequest
    | DestroyRequest
    | HandoffRequest
    | VolumeCreateRequest
    | VolumeExtendRequest
    | VolumeSnapshotRequest
    | VolumeDeleteSnapshotRequest
    | VolumeDeleteRequest,
    Field(discriminator="operation"),
]
VolumeRequest = (
    VolumeCreateRequest
    | VolumeExtendRequest
    | VolumeSnapshotRequest
    | VolumeDeleteSnapshotRequest
    | VolumeDeleteRequest
)
Operation = Literal[
    "create",
    "prepare",
    "start",
    "stop",
    "restart",
    "suspend",
    "update",
    "exit",
    "destroy",
    "handoff",
    "volume_create",
    "volume_extend",
    "volume_snapshot",
    "volume_delete_snapshot",
    "volume_delete",
]


class RunStatus(enum.StrEnum):
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def unfinished(self) -> bool:
        return self in UNFINISHED


UNFINISHED = frozenset({RunStatus.RUNNING, RunStatus.ROLLING_BACK})


class StepRetry(BaseModel):
    """One retry of a step that failed with a retryable error."""

    step: str
    attempt: int
    error: str
    delay_s: float
    at: float


RestartDecision = Literal["restart", "destroy", "stay_stopped"]


class RunProgress(BaseModel):
    """What a run has learnt and done so far, beyond which steps are done."""

    model_config = ConfigDict(extra="forbid")

    current_step: str = ""
    step_seconds: dict[str, float] = Field(default_factory=dict)
    retries: list[StepRetry] = Field(default_factory=list)
    rollback_errors: list[str] = Field(default_factory=list)
    image_resolved: bool = False
    """The image was resolved afresh in this run (create and update insist on it)."""
    exit_recorded: bool = False
    exit_code: int | None = None
    restart_decision: RestartDecision | None = None
    resume_attempted: bool = False
    """A restore from the machine's snapshot was started in this run (recorded before QEMU
    starts): if the snapshot is gone after a crash, the guest may have run on from its disk,
    which is then rebuilt for a cold boot."""
    gpu_xids_collected: bool = False
    """The Xid lines the guest forwarded were recorded against its GPUs."""
    devices: dict[str, Any] = Field(default_factory=dict)
    """What the run's GPU steps learnt, as JSON (``hangar.agent.gpu_steps``): a handoff's
    settings found, scrubs and health findings; why a device call failed."""


class RunRecord(BaseModel):
    """One durable operation on one subject (a machine id, ``gpu:BDF`` for a handoff,
    ``vol:VOLUME_ID`` for a volume's operations)."""

    id: str
    machine_id: str
    request: RunRequest
    status: RunStatus
    steps_done: list[str] = Field(default_factory=list)
    rollback_done: list[str] = Field(default_factory=list)
    progress: RunProgress = Field(default_factory=RunProgress)
    error: str = ""
    created_at: float
    updated_at: float

    @property
    def operation(self) -> Operation:
        return self.request.operation
