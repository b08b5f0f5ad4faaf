"""Route planning and readiness, from snapshots alone (no sockets)."""

from __future__ import annotations

import datetime
from dataclasses import replace

from hangar.model.services import CheckStatus, MachineService
from hangar.proxy.routes import plan_routes
from tests.proxy.conftest import machine, service


def test_apps_share_http_and_tls_ports_but_not_raw_ones() -> None:
    plan = plan_routes(
        [
            machine("a1", "a", "127.0.0.2", [service(80, 8080), service(5432, 5432, [])]),
            machine("b1", "b", "127.0.0.3", [service(80, 8080), service(5432, 5432, [])]),
            machine("c1", "c", "127.0.0.4", [service(80, 8080, [])]),
        ]
    )
    assert set(plan.ports[80].routes) == {"a", "b"}
    assert plan.ports[80].kind == "http"
    assert set(plan.ports[5432].routes) == {"a"}
    assert len(plan.conflicts) == 2
    assert any("raw tcp port 5432" in c and "app b" in c for c in plan.conflicts)
    assert any("app c asks for tcp on port 80" in c for c in plan.conflicts)


def test_a_port_range_publishes_every_port() -> None:
    ranged = MachineService.model_validate(
        {
            "protocol": "tcp",
            "internal_port": 9000,
            "ports": [{"start_port": 7000, "end_port": 7002}],
        }
    )
    plan = plan_routes([machine("a1", "a", "127.0.0.2", [ranged])])
    assert sorted(plan.ports) == [7000, 7001, 7002]


def test_readiness_follows_state_cordon_and_checks() -> None:
    now = datetime.datetime.now(datetime.UTC)
    checked = service(80, 8080, checks=[{"type": "tcp"}])
    item = machine(
        "a1",
        "a",
        "127.0.0.2",
        [checked],
        checks={"db": {"type": "tcp", "port": 5432, "kind": "readiness"}},
    )
    assert item.gating_checks(0) == {"servicecheck-00-tcp-8080", "db"}
    assert item.check_state(0) == "unknown"
    passing = (
        CheckStatus(name="servicecheck-00-tcp-8080", status="passing", updated_at=now),
        CheckStatus(name="db", status="passing", updated_at=now),
    )
    assert replace(item, checks=passing).check_state(0) == "passing"
    failing = (passing[0], CheckStatus(name="db", status="critical", updated_at=now))
    assert replace(item, checks=failing).check_state(0) == "critical"
    informational = machine(
        "a2", "a", "127.0.0.3", [service(80, 8080)], checks={"x": {"type": "tcp", "port": 1}}
    )
    assert informational.check_state(0) == "passing"
    route = plan_routes([replace(item, checks=passing)]).ports[80].routes["a"]
    assert route.members[0].routable
    cordoned = plan_routes([replace(item, checks=passing, cordoned=True)]).ports[80].routes["a"]
    assert not cordoned.members[0].routable
    stopped = plan_routes([replace(item, checks=passing, state="stopped")]).ports[80].routes["a"]
    assert not stopped.members[0].routable
