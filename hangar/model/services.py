"""Services and checks of a machine config, decoded as Fly decodes them.

``config.services[]`` says which of a machine's ports the proxy publishes and how (handlers,
balancing limits, autostart/autostop); ``config.checks{}`` and ``services[].checks[]`` are the
health checks the host runs against the machine's private address. Unknown keys are ignored
(Fly's Go decoder does the same); every value hangar uses is range-checked, and an error names
its field (``config.services[0].ports[0].port``). ``CheckStatus`` is how a check's result
appears in the machine JSON.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from hangar.model.duration import Duration, format_duration
from hangar.model.fly import FlyModel

MAX_SERVICES = 16
MAX_PORTS_PER_SERVICE = 16
MAX_PORT_RANGE = 256
MAX_CHECKS = 16
MAX_CHECK_HEADERS = 32
MAX_CONCURRENCY = 100_000
MAX_MIN_MACHINES = 1000
MIN_CHECK_INTERVAL_S = 1.0
MAX_CHECK_TIMEOUT_S = 60.0
CHECK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,62}$")
HTTP_TOKEN_PATTERN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}$")
# Fly's defaults where a field is absent.
DEFAULT_SOFT_LIMIT = 20
DEFAULT_CHECK_INTERVAL_S = 15.0
DEFAULT_CHECK_TIMEOUT_S = 2.0
DEFAULT_CHECK_GRACE_S = 1.0

PortNumber = Annotated[int, Field(ge=1, le=65535)]
Autostop = Literal["off", "stop", "suspend"]
Handler = Literal["http", "tls"]
CheckState = Literal["passing", "warning", "critical"]


def _autostop(value: object) -> object:
    """fly-go writes autostop as false / true / "suspend"; both spellings decode."""
    if value is True:
        return "stop"
    if value is False:
        return "off"
    return value


def _no_line_breaks(value: str) -> str:
    if any(ch in value for ch in "\r\n\x00"):
        raise ValueError("must not contain CR, LF or NUL")
    return value


class CheckHeader(FlyModel):
    name: Annotated[str, Field(pattern=HTTP_TOKEN_PATTERN.pattern)]
    values: Annotated[
        list[Annotated[str, Field(max_length=1024), AfterValidator(_no_line_breaks)]],
        Field(max_length=16),
    ] = Field(default_factory=list)


class MachineCheck(FlyModel):
    """One tcp or http check (``api.MachineCheck``)."""

    type: Literal["tcp", "http"]
    port: PortNumber | None = None
    interval: Duration | None = None
    timeout: Duration | None = None
    grace_period: Duration | None = None
    method: Annotated[str, Field(pattern=HTTP_TOKEN_PATTERN.pattern)] | None = None
    path: Annotated[str, Field(max_length=2048)] | None = None
    protocol: Literal["http", "https"] | None = None
    tls_skip_verify: bool | None = None
    tls_server_name: Annotated[str, Field(max_length=253)] | None = None
    headers: Annotated[list[CheckHeader], Field(max_length=MAX_CHECK_HEADERS)] = Field(
        default_factory=list
    )
    kind: Literal["informational", "readiness"] | None = None

    @field_validator("interval")
    @classmethod
    def _interval_floor(cls, value: float | None) -> float | None:
        if value is not None and value < MIN_CHECK_INTERVAL_S:
            raise ValueError(f"must be at least {format_duration(MIN_CHECK_INTERVAL_S)}")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_range(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= MAX_CHECK_TIMEOUT_S:
            raise ValueError(
                f"must be more than 0s and at most {format_duration(MAX_CHECK_TIMEOUT_S)}"
            )
        return value

    @field_validator("path")
    @classmethod
    def _http_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or any(c <= " " for c in value)):
            raise ValueError("must start with / and contain no spaces or control characters")
        return value

    @field_validator("tls_server_name")
    @classmethod
    def _server_name(cls, value: str | None) -> str | None:
        return None if value is None else _no_line_breaks(value)

    @property
    def interval_s(self) -> float:
        return DEFAULT_CHECK_INTERVAL_S if self.interval is None else self.interval

    @property
    def timeout_s(self) -> float:
        return DEFAULT_CHECK_TIMEOUT_S if self.timeout is None else self.timeout

    @property
    def grace_period_s(self) -> float:
        return DEFAULT_CHECK_GRACE_S if self.grace_period is None else self.grace_period


class TopLevelCheck(MachineCheck):
    """An entry of ``config.checks``: no service to take a port from, so ``port`` is required."""

    port: PortNumber


def _check_names(value: dict[str, TopLevelCheck]) -> dict[str, TopLevelCheck]:
    if len(value) > MAX_CHECKS:
        raise ValueError(f"at most {MAX_CHECKS} checks")
    for name in value:
        if not CHECK_NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"invalid check name {name!r}: letters, digits, '_', '.', '-', at most 63"
            )
    return value


MachineChecks = Annotated[dict[str, TopLevelCheck], AfterValidator(_check_names)]


class TlsOptions(FlyModel):
    """hangar's proxy speaks TLS 1.2 and 1.3 and HTTP/1.1 over it; options asking for less
    or for something else are refused rather than ignored."""

    alpn: Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=8)] = Field(
        default_factory=list
    )
    versions: list[Literal["TLSv1.2", "TLSv1.3"]] = Field(default_factory=list)
    default_self_signed: bool | None = None

    @field_validator("alpn")
    @classmethod
    def _http11_offered(cls, value: list[str]) -> list[str]:
        if value and "http/1.1" not in value:
            raise ValueError("hangar's proxy serves http/1.1 over TLS; include it")
        return value

    @field_validator("versions")
    @classmethod
    def _both_versions(cls, value: list[str]) -> list[str]:
        if value and set(value) != {"TLSv1.2", "TLSv1.3"}:
            raise ValueError(
                "hangar's proxy serves TLSv1.2 and TLSv1.3; choosing one is not supported yet"
            )
        return value


class HttpResponseOptions(FlyModel):
    # A header set to a string or a list of strings is added; set to false, it is removed.
    headers: Annotated[dict[str, str | list[str] | bool], Field(max_length=32)] = Field(
        default_factory=dict
    )

    @field_validator("headers")
    @classmethod
    def _valid_headers(
        cls, value: dict[str, str | list[str] | bool]
    ) -> dict[str, str | list[str] | bool]:
        for name, item in value.items():
            if not HTTP_TOKEN_PATTERN.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if item is True:
                raise ValueError(f"{name}: a header is a string, a list of strings, or false")
            for text in [item] if isinstance(item, str) else item or []:
                _no_line_breaks(text)
        return value


class HttpOptions(FlyModel):
    compress: bool | None = None
    h2_backend: bool | None = None
    response: HttpResponseOptions | None = None

    @field_validator("compress", "h2_backend")
    @classmethod
    def _not_yet(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("is not supported by hangar yet")
        return value


class MachinePort(FlyModel):
    """One published port (``api.MachinePort``): a single ``port`` or a range."""

    port: PortNumber | None = None
    start_port: PortNumber | None = None
    end_port: PortNumber | None = None
    handlers: Annotated[list[Handler], Field(max_length=2)] = Field(default_factory=list)
    force_https: bool = False
    tls_options: TlsOptions | None = None
    http_options: HttpOptions | None = None
    proxy_proto_options: dict[str, object] | None = None

    @field_validator("proxy_proto_options")
    @classmethod
    def _no_proxy_proto(cls, value: dict[str, object] | None) -> dict[str, object] | None:
        if value:
            raise ValueError("is not supported by hangar yet")
        return value

    @field_validator("handlers")
    @classmethod
    def _handler_order(cls, value: list[Handler]) -> list[Handler]:
        # flyctl writes "-p 443:80/tcp:http:tls" as ["http", "tls"]: TLS is always outermost.
        if len(set(value)) != len(value):
            raise ValueError("must not name a handler twice")
        return sorted(value, key=lambda handler: handler != "tls")

    @model_validator(mode="after")
    def _one_port_or_range(self) -> MachinePort:
        ranged = self.start_port is not None or self.end_port is not None
        if self.port is not None and ranged:
            raise ValueError("give port, or start_port and end_port, not both")
        if self.port is None and not ranged:
            raise ValueError("port is required")
        if ranged:
            if self.start_port is None or self.end_port is None:
                raise ValueError("start_port and end_port go together")
            if not 0 <= self.end_port - self.start_port < MAX_PORT_RANGE:
                raise ValueError(
                    f"end_port must be at least start_port and span at most {MAX_PORT_RANGE}"
                )
        if self.force_https and self.handlers != ["http"]:
            raise ValueError('force_https needs handlers ["http"]')
        return self

    @property
    def numbers(self) -> range:
        """Every host port this entry publishes."""
        if self.port is not None:
            return range(self.port, self.port + 1)
        assert self.start_port is not None and self.end_port is not None
        return range(self.start_port, self.end_port + 1)


class ServiceConcurrency(FlyModel):
    type: Literal["connections", "requests"] = "connections"
    soft_limit: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] | None = None
    hard_limit: Annotated[int, Field(ge=1, le=MAX_CONCURRENCY)] | None = None

    @model_validator(mode="after")
    def _soft_below_hard(self) -> ServiceConcurrency:
        if (
            self.soft_limit is not None
            and self.hard_limit is not None
            and self.soft_limit > self.hard_limit
        ):
            raise ValueError("soft_limit must not be above hard_limit")
        return self

    @property
    def soft(self) -> int:
        if self.soft_limit is not None:
            return self.soft_limit
        if self.hard_limit is not None:
            return min(DEFAULT_SOFT_LIMIT, self.hard_limit)
        return DEFAULT_SOFT_LIMIT


class MachineService(FlyModel):
    """One service (``api.MachineService``): an internal port and how the proxy publishes it."""

    protocol: Literal["tcp", "udp"]
    internal_port: PortNumber
    ports: Annotated[list[MachinePort], Field(max_length=MAX_PORTS_PER_SERVICE)] = Field(
        default_factory=list
    )
    autostop: Annotated[Autostop, BeforeValidator(_autostop)] | None = None
    autostart: bool | None = None
    min_machines_running: Annotated[int, Field(ge=0, le=MAX_MIN_MACHINES)] | None = None
    concurrency: ServiceConcurrency | None = None
    checks: Annotated[list[MachineCheck], Field(max_length=MAX_CHECKS)] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _udp_is_raw(self) -> MachineService:
        if self.protocol == "udp" and any(port.handlers for port in self.ports):
            raise ValueError("udp ports take no handlers")
        return self

    @property
    def limits(self) -> ServiceConcurrency:
        return self.concurrency or ServiceConcurrency()

    @property
    def autostop_mode(self) -> Autostop:
        return self.autostop or "off"

    @property
    def autostart_on(self) -> bool:
        # Fly starts stopped machines for a request unless autostart is false.
        return self.autostart is not False

    @property
    def min_running(self) -> int:
        return self.min_machines_running or 0


MachineServices = Annotated[list[MachineService], Field(max_length=MAX_SERVICES)]


def service_check_name(index: int, check: MachineCheck, internal_port: int) -> str:
    """The name Fly gives a service's check: ``servicecheck-00-http-8080``."""
    return f"servicecheck-{index:02d}-{check.type}-{check.port or internal_port}"


class CheckStatus(BaseModel):
    """One check's latest result, as the machine JSON's ``checks[]`` carries it."""

    name: str
    status: CheckState
    output: str = ""
    updated_at: datetime


PORT_FLAG = re.compile(
    r"^(?P<port>\d{1,5})(?::(?P<internal>\d{1,5}))?(?:/(?P<protocol>[a-z]+)(?P<handlers>(?::[a-z_]+)*))?$"
)


def services_from_port_flags(flags: list[str]) -> list[MachineService]:
    """flyctl's ``-p PORT[:MACHINE_PORT][/PROTOCOL[:HANDLER...]]`` flags as services: one per
    (protocol, machine port), each with its published ports (``80:8080/tcp:http``)."""
    grouped: dict[tuple[str, int], list[dict[str, object]]] = {}
    for flag in flags:
        match = PORT_FLAG.match(flag.strip())
        if match is None:
            raise ValueError(
                f"--port {flag!r}: expected PORT[:MACHINE_PORT][/PROTOCOL[:HANDLER...]], "
                "for example 80:8080/tcp:http"
            )
        port = int(match["port"])
        internal = int(match["internal"] or port)
        protocol = match["protocol"] or "tcp"
        handlers = [name for name in (match["handlers"] or "").split(":") if name]
        grouped.setdefault((protocol, internal), []).append({"port": port, "handlers": handlers})
    services = []
    for (protocol, internal), ports in grouped.items():
        try:
            services.append(
                MachineService.model_validate(
                    {"protocol": protocol, "internal_port": internal, "ports": ports}
                )
            )
        except ValueError as exc:
            raise ValueError(f"--port: {exc}") from None
    return services
