"""Request and response bodies of the Machines API (Fly-compatible shapes)."""

from __future__ import annotations

import math
import re
import shlex
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hangar.errors import InvalidRequest, Unprocessable, UnsupportedField
from hangar.model.config import MachineConfig, StopConfig, signal_number
from hangar.model.duration import TokenLifetime, parse_duration
from hangar.model.fly import FlyModel
from hangar.model.gpu_kinds import GPU_KINDS
from hangar.model.machine import ImageRef, Machine, MachineEvent, rfc3339
from hangar.model.services import CheckStatus
from hangar.store.protocol import OrgQuotas, TokenKind

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_NETWORK = "default"
MAX_LEASE_TTL_S = 3600
DEFAULT_LEASE_TTL_S = 30
DEFAULT_EXEC_TIMEOUT_S = 30.0


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


def _representable_document(data: Any) -> Any:
    found = unrepresentable(data)
    if found is not None:
        path, reason = found
        raise ValueError(f"{path}: {reason}" if path else reason)
    return data


class Body(FlyModel):
    """A request body of Fly's API, read as Fly reads it (:mod:`hangar.model.fly`)."""

    @model_validator(mode="before")
    @classmethod
    def _representable(cls, data: Any) -> Any:
        return _representable_document(data)


class StrictBody(BaseModel):
    """A request body of hangar's own (orgs, tokens, quotas): an unknown key is a 422, as a
    misspelt ``read_only`` must not mint a token that can write."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _representable(cls, data: Any) -> Any:
        return _representable_document(data)


def _zero_is_none(value: object) -> object:
    """Go's zero values of optional fields (``""``, ``0``) mean "not given"."""
    return None if value in ("", 0) and not isinstance(value, bool) else value


class CreateAppRequest(Body):
    """``{app_name | name, org_slug, network, app_role_id}``: older clients send ``app_name``,
    fly-go's flaps sends ``name`` (and always ``network`` and ``app_role_id``, often empty)."""

    app_name: str | None = None
    name: str | None = None
    org_slug: str | None = None
    """Default: an org token's own org; for the operator, ``personal``."""
    network: str | None = None
    app_role_id: str | None = None
    enable_subdomains: bool | None = None

    @field_validator("app_name", "name", "org_slug", "network", "app_role_id", mode="before")
    @classmethod
    def _empty_is_absent(cls, value: object) -> object:
        return _zero_is_none(value)

    @field_validator("app_name", "name", "org_slug")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return None if value is None else _valid_name(value)

    @model_validator(mode="after")
    def _one_name(self) -> CreateAppRequest:
        if self.app_name is None and self.name is None:
            raise ValueError("app_name: required (or name)")
        if self.app_name is not None and self.name is not None and self.app_name != self.name:
            raise ValueError("app_name and name differ: give one")
        if self.network not in (None, DEFAULT_NETWORK):
            raise UnsupportedField(
                "network", "names a custom network: an app is on its org's network"
            )
        if self.app_role_id is not None:
            raise UnsupportedField("app_role_id")
        return self

    @property
    def app(self) -> str:
        name = self.app_name or self.name
        assert name is not None
        return name


class CreateMachineRequest(Body):
    name: str | None = None
    region: str | None = None
    config: MachineConfig
    skip_launch: bool = False
    skip_service_registration: bool = False
    """Kept out of the proxy's rotation: the machine is created cordoned."""
    skip_secrets: bool = False
    min_secrets_version: Annotated[int, Field(ge=0)] | None = None
    lease_ttl: Annotated[int, Field(ge=1, le=MAX_LEASE_TTL_S)] | None = None
    lsvd: bool = False

    @field_validator("name", "region", "lease_ttl", "min_secrets_version", mode="before")
    @classmethod
    def _empty_is_absent(cls, value: object) -> object:
        return _zero_is_none(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _valid_name(value)

    @field_validator("lsvd")
    @classmethod
    def _no_lsvd(cls, value: bool) -> bool:
        if value:
            raise UnsupportedField("lsvd")
        return value


class UpdateMachineRequest(CreateMachineRequest):
    current_version: str | None = None

    @field_validator("current_version", mode="before")
    @classmethod
    def _version_text(cls, value: object) -> object:
        if value == "":
            return None
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class StopRequest(StopConfig, Body):
    """``POST .../stop``: the same fields as ``config.stop_config``, for this stop only."""


class SignalRequest(Body):
    signal: str

    @field_validator("signal", mode="before")
    @classmethod
    def _signal(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # flaps' Kill sends {"signal": 9}
        if isinstance(value, str):
            signal_number(value)
        return value


class LeaseRequest(Body):
    ttl: Annotated[int, Field(ge=1, le=MAX_LEASE_TTL_S)] | None = None
    description: Annotated[str, Field(max_length=256)] = ""

    @field_validator("ttl", mode="before")
    @classmethod
    def _empty_is_absent(cls, value: object) -> object:
        return _zero_is_none(value)


class MetadataValue(Body):
    value: Annotated[str, Field(max_length=1024)]


class MetadataUpdate(Body):
    """``PATCH .../metadata``: keys set to a value are set; to ``""`` or ``null``, removed."""

    metadata: Annotated[dict[str, Annotated[str, Field(max_length=1024)] | None], Field()]


class ExecRequest(Body):
    """``POST .../exec``: ``cmd`` (a shell-quoted string, as fly-go sends it) or ``command``
    (a list, as newer clients send it); ``timeout`` in seconds (or a Go duration); ``stdin``.
    The command runs in the guest's root, as root, never on the host."""

    cmd: str | list[str] | None = None
    command: list[str] | None = None
    stdin: str = ""
    timeout: int | str | None = None
    container: str = ""
    machine: bool = False

    @field_validator("container")
    @classmethod
    def _no_container(cls, value: str) -> str:
        if value:
            raise UnsupportedField("container", "names a container: a machine runs one image")
        return value

    @field_validator("machine")
    @classmethod
    def _no_machine_namespace(cls, value: bool) -> bool:
        if value:
            raise UnsupportedField(
                "machine", "asks for the init's namespace: exec runs in the image"
            )
        return value

    def argv(self) -> list[str]:
        if self.command:
            return list(self.command)
        if isinstance(self.cmd, list):
            return list(self.cmd)
        try:
            return shlex.split(self.cmd or "")
        except ValueError as error:
            raise InvalidRequest(f"cmd: {error}", field="cmd") from None

    def timeout_s(self) -> float:
        if self.timeout is None:
            return DEFAULT_EXEC_TIMEOUT_S
        if isinstance(self.timeout, int):
            return float(self.timeout)
        if self.timeout.strip().isdigit():
            return float(self.timeout)
        try:
            return parse_duration(self.timeout, maximum=math.inf, minimum=-math.inf)
        except ValueError as error:
            raise InvalidRequest(f"timeout: {error}", field="timeout") from None


class SetSecretRequest(Body):
    value: str


class UpdateSecretsRequest(Body):
    """``POST .../secrets``: each value set, or (``null``) removed."""

    values: dict[str, str | None]


class OkResponse(BaseModel):
    ok: bool = True


class OrganizationView(BaseModel):
    name: str
    slug: str


class AppView(BaseModel):
    id: str
    name: str
    internal_numeric_id: int
    network: str
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


class EventView(BaseModel):
    """A machine event as Fly sends it: ``request`` only on exits; ``reason`` (hangar's) only
    when there is one."""

    id: str
    type: str
    status: str
    source: str
    timestamp: int
    request: dict[str, Any] | None = None
    reason: str | None = None


def fly_event(event: MachineEvent) -> EventView:
    return EventView(
        id=event.id,
        type=event.type,
        status=event.status,
        source=event.source,
        timestamp=event.timestamp,
        request=_fly_request(event),
        reason=event.reason or None,
    )


def _fly_request(event: MachineEvent) -> dict[str, Any] | None:
    """Only what Fly's ``MachineRequest`` carries: an exit's ``exit_event`` (its time as
    RFC 3339, Go's ``time.Time``) and ``restart_count``. Records made by an older hangar kept
    other keys here; they are not sent."""
    exit_event = (event.request or {}).get("exit_event")
    if event.type != "exit" or not isinstance(exit_event, dict):
        return None
    exited_at = exit_event.get("exited_at")
    if isinstance(exited_at, int | float) and not isinstance(exited_at, bool):
        exit_event = {**exit_event, "exited_at": rfc3339(exited_at / 1000)}
    restart_count = (event.request or {}).get("restart_count", 0)
    return {
        "exit_event": {key: value for key, value in exit_event.items() if value is not None},
        "restart_count": restart_count if isinstance(restart_count, int) else 0,
    }


class MachineView(BaseModel):
    """A machine as fly-go's ``Machine`` decodes it (``version`` a string; ``private_ip`` and
    ``nonce`` left out when there are none: routes send it with ``exclude_none``)."""

    id: str
    name: str
    state: str
    region: str
    instance_id: str
    version: str
    private_ip: str | None = None
    config: dict[str, Any]
    image_ref: ImageRef
    created_at: str
    updated_at: str
    events: list[EventView] = Field(default_factory=list)
    checks: list[CheckStatus] = Field(default_factory=list)
    nonce: str | None = None
    host_status: str = "ok"
    incomplete_config: dict[str, Any] | None = None
    """The config as last recorded, when the machine's host is not answering (Fly's)."""
    cordoned: bool = False
    failure_reason: str | None = None
    tier: str = "vm"
    """hangar: ``vm`` or ``sandbox`` (Fly's clients ignore the key)."""

    @classmethod
    def of(
        cls, machine: Machine, events: list[MachineEvent], nonce: str | None = None
    ) -> MachineView:
        return cls(
            id=machine.id,
            name=machine.name,
            state=str(machine.state),
            region=machine.region,
            instance_id=machine.instance_id,
            version=str(machine.version),
            private_ip=machine.private_ip or None,
            config=machine.config.model_dump(mode="json", exclude_none=True),
            image_ref=machine.image_ref,
            created_at=iso8601(machine.created_at),
            updated_at=iso8601(machine.updated_at),
            events=[fly_event(event) for event in events],
            checks=machine.checks,
            nonce=nonce,
            cordoned=machine.cordoned,
            failure_reason=machine.failure_reason or None,
            tier=machine.tier.value,
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


class WaitResponse(BaseModel):
    ok: bool = True
    state: str
    event_id: str | None = None
    version: str


class StartResponse(BaseModel):
    previous_state: str


class ExecResponse(BaseModel):
    """fly-go's ``MachineExecResponse``, with hangar's flags: each stream keeps its first MiB
    (``*_truncated`` says it was cut), ``timed_out`` says the command was killed."""

    exit_code: int
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timed_out: bool = False


class ListenSocket(BaseModel):
    proto: str
    address: str


class ProcessStat(BaseModel):
    """fly-go's ``ProcessStat``: ``stime`` is when the process started, in seconds after the
    guest booted; ``rtime`` and ``cpu`` its CPU time in milliseconds and whole seconds;
    ``rss`` in bytes. hangar adds ``ppid``, ``user``, ``state`` and ``argv``."""

    pid: int
    stime: int
    rtime: int
    command: str
    directory: str
    cpu: int
    rss: int
    listen_sockets: list[ListenSocket] = Field(default_factory=list)
    ppid: int
    user: str
    state: str
    argv: list[str]


class MachineVersionView(BaseModel):
    version: str
    user_config: dict[str, Any]
    created_at: str
    replaced_at: str | None = None


class SecretView(BaseModel):
    """An app secret as shown: name and digest, never the value."""

    name: str
    digest: str
    created_at: str
    updated_at: str


class SecretList(BaseModel):
    secrets: list[SecretView]


class SecretSet(SecretView):
    version: int


class SecretsUpdated(BaseModel):
    secrets: list[SecretView]
    version: int


class SecretsVersion(BaseModel):
    version: int


def iso8601(timestamp: float) -> str:
    return rfc3339(timestamp)


# orgs, tokens, audit
class CreateOrgRequest(StrictBody):
    slug: str
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    _slug = field_validator("slug")(_valid_name)


class QuotasRequest(StrictBody):
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
    gpus: dict[str, float]
    """GPUs by kind; a MIG slice or a time share counts as its fraction of one GPU."""
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


class CreateTokenRequest(StrictBody):
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
