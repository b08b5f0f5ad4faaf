"""Two orgs on the shared server, each with apps, a leased machine and a token of every kind."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from hangar.api.services.tokens import TokenService
from hangar.clock import ManualClock, SystemClock
from hangar.settings import DATABASE
from hangar.store.machines import SqliteMachineStore
from hangar.store.tenancy import SqliteTenancyStore
from tests.api.helpers import unique
from tests.conftest import kill_vmms_under
from tests.fixtures.inprocess import InProcessServer


@dataclass
class Tenant:
    org: str
    app: str
    other_app: str
    machine_id: str = ""
    lease_nonce: str = ""
    tokens: dict[str, str] = field(default_factory=dict)
    """kind -> secret: org, org_read_only, app, app_read_only, other_app, expired, revoked"""


def create_token(api: httpx.Client, **body: object) -> str:
    response = api.post("/v1/tokens", json=body)
    assert response.status_code == 201, response.text
    secret: str = response.json()["token"]
    return secret


@pytest.fixture(scope="session")
def api_server(
    tmp_path_factory: pytest.TempPathFactory, registry: str
) -> Iterator[InProcessServer]:
    """The API tests' server: the real app, agent and stores in this process."""
    home = tmp_path_factory.mktemp("api-home")
    try:
        with InProcessServer(
            home,
            insecure_registries=frozenset({registry}),
            local_registries=frozenset({registry}),
        ) as server:
            yield server
    finally:
        kill_vmms_under(home)


@pytest.fixture
def api(api_server: InProcessServer) -> Iterator[httpx.Client]:
    with api_server.client() as client:
        yield client


def expired_token(server: InProcessServer, org: str) -> str:
    """A token that expired an hour ago, minted as ``hangar admin token`` does: in the DB."""
    database = server.home / DATABASE
    an_hour_and_a_bit_ago = SystemClock().now() - 3700
    tokens = TokenService(
        SqliteTenancyStore(database),
        SqliteMachineStore(database),
        ManualClock(an_hour_and_a_bit_ago),
    )
    _token, secret = tokens.issue(org, ttl_s=60, description="expired in tests")
    return secret


def make_tenant(server: InProcessServer, api: httpx.Client, name: str, image: str) -> Tenant:
    tenant = Tenant(org=unique(name), app=unique(f"{name}-app"), other_app=unique(f"{name}-two"))
    assert api.post("/v1/orgs", json={"slug": tenant.org}).status_code == 201
    for app in (tenant.app, tenant.other_app):
        created = api.post("/v1/apps", json={"app_name": app, "org_slug": tenant.org})
        assert created.status_code == 201, created.text
    machine = api.post(
        f"/v1/apps/{tenant.app}/machines",
        json={"config": {"image": image}, "skip_launch": True},
    )
    assert machine.status_code == 200, machine.text
    tenant.machine_id = machine.json()["id"]
    lease = api.post(
        f"/v1/apps/{tenant.app}/machines/{tenant.machine_id}/lease", json={"ttl": 3600}
    )
    assert lease.status_code == 200, lease.text
    tenant.lease_nonce = lease.json()["data"]["nonce"]
    org = tenant.org
    tenant.tokens = {
        "org": create_token(api, org_slug=org),
        "org_read_only": create_token(api, org_slug=org, read_only=True),
        "app": create_token(api, org_slug=org, app_name=tenant.app),
        "app_read_only": create_token(api, org_slug=org, app_name=tenant.app, read_only=True),
        "other_app": create_token(api, org_slug=org, app_name=tenant.other_app),
        "expired": expired_token(server, org),
    }
    revoked = api.post("/v1/tokens", json={"org_slug": org})
    assert api.delete(f"/v1/tokens/{revoked.json()['id']}").status_code == 200
    tenant.tokens["revoked"] = revoked.json()["token"]
    return tenant


@dataclass
class Tenants:
    a: Tenant
    b: Tenant
    operator: str


@pytest.fixture(scope="session")
def tenants(api_server: InProcessServer, test_image: str) -> Tenants:
    with api_server.client() as api:
        return Tenants(
            a=make_tenant(api_server, api, "alpha", test_image),
            b=make_tenant(api_server, api, "bravo", test_image),
            operator=api_server.operator_token,
        )


@pytest.fixture
def as_token(api_server: InProcessServer) -> Iterator[Any]:
    """``as_token(secret)``: a client of the API tests' server acting with that token."""
    clients: list[httpx.Client] = []

    def client(secret: str) -> httpx.Client:
        clients.append(api_server.client(secret))
        return clients[-1]

    yield client
    for opened in clients:
        opened.close()
