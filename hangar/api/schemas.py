"""Request and response bodies of the Machines API (Fly-compatible shapes)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hangar.model.config import MachineConfig, signal_number
from hangar.model.machine import ImageRef, Machine, MachineEvent

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _valid_name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(
            "must be 1-63 characters: lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    return value


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateAppRequest(Body):
    app_name: str
    org_slug: str = "personal"
    network: str | None = None
    enable_subdomains: bool | None = None

    _name = field_validator("app_name", "org_slug")(_valid_name)


class CreateMachineRequest(Body):
    name: str | None = None
    region: str | None = None
    config: MachineConfig
    skip_launch: bool = False
    skip_service_registration: bool | None = None
    lease_ttl: Annotated[int, Field(ge=1, le=3600)] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _valid_name(value)


class UpdateMachineRequest(CreateMachineRequest):
    current_version: str | None = None


class StopRequest(Body):
    signal: str | None = None
    timeout: Any = None

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str | None) -> str | None:
        if value is not None:
            signal_number(value)
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: object) -> object:
        from hangar.model.config import parse_duration_seconds

        if value is not None:
            parse_duration_seconds(value)
        return value


class SignalRequest(Body):
    signal: str

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        signal_number(value)
        return value


class LeaseRequest(Body):
    ttl: Annotated[int, Field(ge=1, le=3600)] = 30
    description: Annotated[str, Field(max_length=256)] = ""


class MetadataValue(Body):
    value: Annotated[str, Field(max_length=1024)]


class OkResponse(BaseModel):
    ok: bool = True


class ErrorBody(BaseModel):
    error: str
    status: str


class OrganizationView(BaseModel):
    name: str
    slug: str


class AppView(BaseModel):
    id: str
    name: str
    organization: OrganizationView
    status: str = "deployed"
    machine_count: int = 0


class AppList(BaseModel):
    total_apps: int
    apps: list[AppView]


class LeaseData(BaseModel):
    nonce: str
    expires_at: int
    owner: str
    description: str
    version: str


class LeaseView(BaseModel):
    status: str = "success"
    data: LeaseData


class MachineView(BaseModel):
    id: str
    name: str
    state: str
    region: str
    instance_id: str
    private_ip: str
    config: dict[str, Any]
    image_ref: ImageRef
    created_at: str
    updated_at: str
    events: list[MachineEvent] = Field(default_factory=list)
    host_status: str = "ok"
    version: int
    failure_reason: str = ""

    @classmethod
    def of(cls, machine: Machine, events: list[MachineEvent]) -> MachineView:
        return cls(
            id=machine.id,
            name=machine.name,
            state=str(machine.state),
            region=machine.region,
            instance_id=machine.instance_id,
            private_ip=machine.private_ip,
            config=machine.config.model_dump(mode="json", exclude_none=True),
            image_ref=machine.image_ref,
            created_at=iso8601(machine.created_at),
            updated_at=iso8601(machine.updated_at),
            events=events,
            version=machine.version,
            failure_reason=machine.failure_reason,
        )


def iso8601(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
