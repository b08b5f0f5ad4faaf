"""Request and response bodies of the Machines API (Fly-compatible shapes)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hangar.errors import Unprocessable
from hangar.model.config import MachineConfig, StopConfig, signal_number
from hangar.model.duration import TokenLifetime
from hangar.model.gpu_kinds import GPU_KINDS
from hangar.model.machine import ImageRef, Machine, MachineEvent
from hangar.model.services import CheckStatus
from hangar.store.protocol import OrgQuotas, TokenKind

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _valid_name(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            "must be 1-63 characters: lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit"
        )
    return value


MAX_JSON_INTEGER = 2**63 - 1


def unrepresentable(document: object) -> tuple[str, str] | None:
    """The first value in a JSON document that no field could mean, and why: an integer
    beyond 64 bits (Fly's API is int64 throughout), NaN or Infinity (which Python's JSON
    parser accepts), or a string with a lone surrogate (which is not text and cannot be
    stored). Refusing them up front keeps every validator and the store behind safe. Walks
    with its own stack: a deeply nested document must not exhaust Python's."""
    pending: list[tuple[str, object]] = [("", document)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and abs(value) > MAX_JSON_INTEGER:
            return path, "must fit in 64 bits"
        if isinstance(value, float) and not math.isfinite(value):
            return path, "must be a finite number"
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path, "must be valid Unicode text (no lone surrogates)"
        children: list[tuple[str, object]] = []
        if isinstance(value, dict):
            for key, item in value.items():
                key_path = f"{path}.{key}" if path else str(key)
                children += [(key_path, item), (key_path, str(key))]
        elif isinstance(value, list):
            children = [(f"{path}.{i}" if path else str(i), item) for i, item in enumerate(value)]
        pending.extend(reversed(children))
    return None


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _representable(cls, data: Any) -> Any:
        found = unrepresentable(data)
        if found is not None:
            path, reason = found
            raise ValueError(f"{path}: {reason}" if path else reason)
        return data


class CreateAppRequest(Body):
    app_name: str
    org_slug: str | None = None
    """Default: an org token's own org; for the operator, ``personal``."""
    network: str | None = None
    enable_subdomains: bool | None = None

    @field_validator("app_name", "org_slug")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return None if value is None else _valid_name(value)


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


class StopRequest(StopConfig, Body):
    """``POST .../stop``: the same fields as ``config.stop_config``, for this stop only."""


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


class OrganizationView(BaseModel):
    name: str
    slug: str


class AppView(BaseModel):
    id: str
    name: str
    organization: OrganizationView
    status: str = "deployed"
    machine_count: int = 0
    volume_count: int = 0


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
    incomplete_config: dict[str, Any] | None = None
    """The config as last recorded, when the machine's host is not answering (Fly's)."""
    version: int
    failure_reason: str = ""
    cordoned: bool = False
    checks: list[CheckStatus] = Field(default_factory=list)

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
            cordoned=machine.cordoned,
            checks=machine.checks,
        )


MAX_PAGE = 1000
"""The most machines one page of ``GET .../machines?limit=`` may hold."""


class MachinePage(BaseModel):
    """``GET /v1/apps/{app}/machines?limit=N&after=ID``: at most ``limit`` machines, those
    after machine ``after`` (oldest first). Without ``limit`` the list is whole, as Fly's
    clients expect."""

    limit: int
    after: str | None = None

    @classmethod
    def parse(cls, limit: str | None, after: str | None) -> MachinePage | None:
        """From the query's raw values; a bad one is a 422 naming it."""
        if limit is None:
            if after is not None:
                raise Unprocessable("after: only with limit (a page size)", field="after")
            return None
        text = limit.strip()
        digits = text.isascii() and text.isdigit() and len(text) <= len(str(MAX_PAGE))
        size = int(text) if digits else 0
        if not 1 <= size <= MAX_PAGE:
            raise Unprocessable(
                f"limit: {limit[:32]!r} is not a page size from 1 to {MAX_PAGE}", field="limit"
            )
        if after is not None and not after:
            raise Unprocessable("after: empty (a machine id from the previous page)", field="after")
        return cls(limit=size, after=after)


def iso8601(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# orgs, tokens, audit
class CreateOrgRequest(Body):
    slug: str
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    _slug = field_validator("slug")(_valid_name)


class QuotasRequest(Body):
    """Per-org limits; an absent or null field means no limit."""

    machines: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    memory_mb: Annotated[int, Field(ge=0, le=1 << 40)] | None = None
    gpus: dict[str, Annotated[int, Field(ge=0, le=100_000)]] = Field(default_factory=dict)
    volumes: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    volume_gb: Annotated[int, Field(ge=0, le=1 << 40)] | None = None

    @field_validator("gpus")
    @classmethod
    def _known_kinds(cls, value: dict[str, int]) -> dict[str, int]:
        known = {kind.name for kind in GPU_KINDS}
        for kind in value:
            if kind not in known:
                raise ValueError(
                    f"unknown GPU kind {kind!r}; known kinds: {', '.join(sorted(known))}"
                )
        return value

    def quotas(self) -> OrgQuotas:
        return OrgQuotas(
            machines=self.machines,
            memory_mb=self.memory_mb,
            gpus=dict(self.gpus),
            volumes=self.volumes,
            volume_gb=self.volume_gb,
        )


class OrgUsageView(BaseModel):
    machines: int
    memory_mb: int
    gpus: dict[str, int]
    volumes: int = 0
    volume_gb: int = 0


class OrgDetail(BaseModel):
    slug: str
    name: str
    created_at: str
    quotas: OrgQuotas
    usage: OrgUsageView


class OrgList(BaseModel):
    orgs: list[OrgDetail]


class CreateTokenRequest(Body):
    org_slug: str
    app_name: str | None = None
    read_only: bool = False
    expires_in: TokenLifetime | None = None
    """``90s``, ``30m``, ``24h``, ``7d``...; absent: the token does not expire."""
    description: Annotated[str, Field(max_length=256)] = ""

    @field_validator("org_slug", "app_name")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return None if value is None else _valid_name(value)


class TokenView(BaseModel):
    id: str
    kind: TokenKind
    org_slug: str | None
    app_name: str | None
    read_only: bool
    description: str
    status: str
    """active, expired or revoked"""
    created_at: str
    expires_at: str | None
    revoked_at: str | None


class TokenCreated(TokenView):
    token: str
    """The secret: shown here once, never stored."""


class TokenList(BaseModel):
    tokens: list[TokenView]


class AuditView(BaseModel):
    seq: int
    time: str
    timestamp: float
    token_id: str
    org_slug: str
    action: str
    target: str
    app_name: str
    machine_id: str
    outcome: str
    status: int


class AuditList(BaseModel):
    records: list[AuditView]
