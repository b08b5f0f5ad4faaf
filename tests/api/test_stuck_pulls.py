"""One tenant's registry that drips its answer forever must not hold another tenant's
starts, and force-destroying a machine stuck on it stops the pull."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.helpers import machine_path, wait_state
from tests.api.conftest import create_token
from tests.api.helpers import unique
from tests.fixtures.hostile import Served, drip, tcp_service
from tests.fixtures.inprocess import InProcessServer

GUARD_S = 120.0
STUCK = 6


@pytest.fixture
def tarpit() -> Iterator[Served]:
    with tcp_service(drip) as served:
        yield served


def test_a_tarpit_registry_holds_only_its_own_tenant(
    tmp_path: Path, tarpit: Served, test_image: str
) -> None:
    with InProcessServer(
        tmp_path,
        local_registries=frozenset({tarpit.authority}),
        insecure_registries=frozenset({tarpit.authority}),
        image_workers=2,
        image_workers_per_org=1,
        image_pull_timeout_s=GUARD_S,
    ) as server:
        with server.client() as operator:
            tokens = {}
            for org in ("slow", "fast"):
                slug = unique(org)
                assert operator.post("/v1/orgs", json={"slug": slug}).status_code == 201
                tokens[org] = create_token(operator, org_slug=slug)
        with server.client(tokens["slow"]) as slow, server.client(tokens["fast"]) as fast:
            slow_app, fast_app = unique("slow-app"), unique("fast-app")
            assert slow.post("/v1/apps", json={"app_name": slow_app}).status_code == 201
            assert fast.post("/v1/apps", json={"app_name": fast_app}).status_code == 201
            stuck = []
            for _ in range(STUCK):
                config = {"image": f"{tarpit.authority}/slow/app:latest"}
                created = slow.post(f"/v1/apps/{slow_app}/machines", json={"config": config})
                assert created.status_code == 200, created.text
                stuck.append(created.json()["id"])
            config = {
                "image": test_image,
                "init": {"cmd": ["sh", "-c", "sleep 600"]},
                "restart": {"policy": "no"},
            }
            created = fast.post(f"/v1/apps/{fast_app}/machines", json={"config": config})
            assert created.status_code == 200, created.text
            quick = created.json()["id"]
            wait_state(fast, fast_app, quick, "started", timeout_s=GUARD_S)
            images = server.embedded.agent.platform.images  # type: ignore[attr-defined]
            assert images.workers.running().get(_org_of(server, slow_app), 0) <= 1
            for machine_id in stuck:
                assert slow.get(machine_path(slow_app, machine_id)).json()["state"] == "starting"

            began = time.monotonic()
            for machine_id in stuck:
                response = slow.delete(machine_path(slow_app, machine_id), params={"force": "true"})
                assert response.status_code == 200, response.text
            for machine_id in stuck:
                wait_state(slow, slow_app, machine_id, "destroyed", timeout_s=GUARD_S)
            assert time.monotonic() - began < GUARD_S / 2
            deadline = time.monotonic() + GUARD_S
            while images.workers.running() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert images.workers.running() == {}, "the pulls stopped with their machines"
            fast.delete(machine_path(fast_app, quick), params={"force": "true"})


def _org_of(server: InProcessServer, app: str) -> str:
    found = server.embedded.stores.machines.get_app(app)
    assert found is not None
    return found.org_slug
