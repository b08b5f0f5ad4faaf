"""config.services and config.checks decode as Fly decodes them, and bad values name their field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from hangar.model.config import MachineConfig
from hangar.model.services import MachineService, service_check_name, services_from_port_flags

FLYCTL_SERVICE = {
    "protocol": "tcp",
    "internal_port": 8080,
    "autostop": "suspend",
    "autostart": True,
    "min_machines_running": 1,
    "ports": [
        {"port": 80, "handlers": ["http"], "force_https": True},
        {"port": 443, "handlers": ["tls", "http"], "tls_options": {"alpn": ["h2", "http/1.1"]}},
    ],
    "concurrency": {"type": "requests", "soft_limit": 20, "hard_limit": 25},
    "checks": [{"type": "http", "interval": "10s", "timeout": "2s", "path": "/health"}],
    "force_instance_key": "ignored by hangar",
}


def location(exc: ValidationError) -> tuple[Any, ...]:
    return tuple(exc.errors()[0]["loc"])


def test_a_flyctl_service_round_trips() -> None:
    config = MachineConfig.model_validate(
        {
            "image": "x",
            "services": [FLYCTL_SERVICE],
            "checks": {"alive": {"type": "tcp", "port": 8080, "interval": "1m0s"}},
        }
    )
    service = config.services[0]
    assert service.autostop_mode == "suspend"
    assert service.limits.soft == 20 and service.limits.hard_limit == 25
    assert [list(port.numbers) for port in service.ports] == [[80], [443]]
    assert service.checks[0].interval_s == 10.0
    assert config.checks["alive"].interval_s == 60.0
    dumped = config.model_dump(mode="json", exclude_none=True)
    assert dumped["checks"]["alive"]["interval"] == "1m0s"
    assert dumped["services"][0]["checks"][0]["timeout"] == "2s"
    assert "force_instance_key" not in dumped["services"][0]
    assert MachineConfig.model_validate(dumped) == config


@pytest.mark.parametrize(
    ("value", "mode"), [(True, "stop"), (False, "off"), ("suspend", "suspend")]
)
def test_autostop_decodes_both_spellings(value: object, mode: str) -> None:
    service = MachineService.model_validate(
        {"protocol": "tcp", "internal_port": 80, "autostop": value}
    )
    assert service.autostop_mode == mode


def test_defaults_follow_fly() -> None:
    service = MachineService.model_validate({"protocol": "tcp", "internal_port": 80})
    assert service.autostop_mode == "off"
    assert service.autostart_on
    assert service.min_running == 0
    assert service.limits.type == "connections"
    assert service.limits.soft == 20 and service.limits.hard_limit is None


@pytest.mark.parametrize(
    ("services", "loc"),
    [
        ([{"protocol": "tcp", "internal_port": 0}], ("services", 0, "internal_port")),
        ([{"protocol": "sctp", "internal_port": 80}], ("services", 0, "protocol")),
        (
            [{"protocol": "tcp", "internal_port": 80, "ports": [{"port": 70000}]}],
            ("services", 0, "ports", 0, "port"),
        ),
        (
            [{"protocol": "tcp", "internal_port": 80, "ports": [{"port": 80, "handlers": ["pg"]}]}],
            ("services", 0, "ports", 0, "handlers", 0),
        ),
        (
            [
                {
                    "protocol": "tcp",
                    "internal_port": 80,
                    "ports": [{"port": 80, "handlers": ["http", "http"]}],
                }
            ],
            ("services", 0, "ports", 0, "handlers"),
        ),
        (
            [{"protocol": "tcp", "internal_port": 80, "ports": [{"handlers": ["http"]}]}],
            ("services", 0, "ports", 0),
        ),
        (
            [{"protocol": "tcp", "internal_port": 80, "ports": [{"start_port": 9, "end_port": 1}]}],
            ("services", 0, "ports", 0),
        ),
        (
            [
                {
                    "protocol": "tcp",
                    "internal_port": 80,
                    "concurrency": {"soft_limit": 30, "hard_limit": 25},
                }
            ],
            ("services", 0, "concurrency"),
        ),
        (
            [
                {
                    "protocol": "tcp",
                    "internal_port": 80,
                    "ports": [{"port": 443, "handlers": ["tls"], "tls_options": {"alpn": ["h2"]}}],
                }
            ],
            ("services", 0, "ports", 0, "tls_options", "alpn"),
        ),
        (
            [{"protocol": "tcp", "internal_port": 80, "min_machines_running": -1}],
            ("services", 0, "min_machines_running"),
        ),
        (
            [{"protocol": "tcp", "internal_port": 80, "autostop": "sometimes"}],
            ("services", 0, "autostop"),
        ),
        (
            [{"protocol": "tcp", "internal_port": 80, "checks": [{"type": "http", "path": "x"}]}],
            ("services", 0, "checks", 0, "path"),
        ),
        (
            [
                {
                    "protocol": "tcp",
                    "internal_port": 80,
                    "checks": [{"type": "tcp", "interval": "10ms"}],
                }
            ],
            ("services", 0, "checks", 0, "interval"),
        ),
        (
            [
                {
                    "protocol": "udp",
                    "internal_port": 53,
                    "ports": [{"port": 53, "handlers": ["tls"]}],
                }
            ],
            ("services", 0),
        ),
    ],
)
def test_bad_services_name_the_field(services: list[dict[str, Any]], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        MachineConfig.model_validate({"image": "x", "services": services})
    assert location(caught.value)[: len(loc)] == loc


@pytest.mark.parametrize(
    ("checks", "loc"),
    [
        ({"web": {"type": "tcp"}}, ("checks", "web", "port")),
        ({"web": {"type": "udp", "port": 80}}, ("checks", "web", "type")),
        ({"web": {"type": "http", "port": 80, "timeout": "2m"}}, ("checks", "web", "timeout")),
        ({"web": {"type": "http", "port": 80, "method": "GET /x"}}, ("checks", "web", "method")),
        (
            {"web": {"type": "http", "port": 80, "headers": [{"name": "X", "values": ["a\r\nb"]}]}},
            ("checks", "web", "headers", 0, "values", 0),
        ),
        ({"bad name": {"type": "tcp", "port": 80}}, ("checks",)),
    ],
)
def test_bad_checks_name_the_field(checks: dict[str, Any], loc: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        MachineConfig.model_validate({"image": "x", "checks": checks})
    assert location(caught.value)[: len(loc)] == loc


def test_service_checks_are_named_as_fly_names_them() -> None:
    service = MachineService.model_validate(FLYCTL_SERVICE)
    assert service_check_name(0, service.checks[0], service.internal_port) == (
        "servicecheck-00-http-8080"
    )


def test_handlers_in_either_order_mean_tls_then_http() -> None:
    service = MachineService.model_validate(
        {
            "protocol": "tcp",
            "internal_port": 80,
            "ports": [{"port": 443, "handlers": ["http", "tls"]}],
        }
    )
    assert service.ports[0].handlers == ["tls", "http"]


def test_port_flags_as_flyctl_writes_them() -> None:
    services = services_from_port_flags(
        ["80:8080/tcp:http", "443:8080/tcp:http:tls", "5432/tcp", "53:5353/udp"]
    )
    dumped = [s.model_dump(mode="json", exclude_none=True) for s in services]
    assert [(d["protocol"], d["internal_port"]) for d in dumped] == [
        ("tcp", 8080),
        ("tcp", 5432),
        ("udp", 5353),
    ]
    assert [(p["port"], p["handlers"]) for p in dumped[0]["ports"]] == [
        (80, ["http"]),
        (443, ["tls", "http"]),
    ]
    assert dumped[1]["ports"] == [{"port": 5432, "handlers": [], "force_https": False}]


@pytest.mark.parametrize("flag", ["80:", "http", "80/tcp:gopher", "70000:80", "53/udp:http", ""])
def test_bad_port_flags_are_refused(flag: str) -> None:
    with pytest.raises(ValueError, match="--port"):
        services_from_port_flags([flag])
