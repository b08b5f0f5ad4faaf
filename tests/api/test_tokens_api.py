"""Tokens through the API, and the operator token a server writes at its first start."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from hangar.api.services.tokens import TokenService
from hangar.clock import ManualClock
from hangar.errors import Unauthenticated
from hangar.server import BOOTSTRAP_TOKEN_DESCRIPTION, bootstrap_operator_token
from hangar.settings import DATABASE, OPERATOR_TOKEN_FILE
from hangar.store.machines import SqliteMachineStore
from hangar.store.tenancy import SqliteTenancyStore
from tests.api.conftest import Tenants
from tests.api.helpers import assert_fly_error, unique
from tests.fixtures.inprocess import InProcessServer


def test_a_token_is_shown_once_then_listed_without_its_secret(
    api: httpx.Client, tenants: Tenants, as_token: Any
) -> None:
    created = api.post(
        "/v1/tokens",
        json={
            "org_slug": tenants.a.org,
            "read_only": True,
            "expires_in": "1h",
            "description": "ci",
        },
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"] == "active" and body["read_only"] and body["expires_at"]
    listed = api.get("/v1/tokens", params={"org_slug": tenants.a.org})
    assert body["id"] in listed.text
    assert body["token"] not in listed.text
    assert "token" not in listed.json()["tokens"][0]
    with as_token(body["token"]) as client:
        assert client.get(f"/v1/apps/{tenants.a.app}").status_code == 200
        assert api.delete(f"/v1/tokens/{body['id']}").json()["status"] == "revoked"
        assert_fly_error(client.get(f"/v1/apps/{tenants.a.app}"), 401, "revoked")


def test_token_requests_are_validated(api: httpx.Client, tenants: Tenants) -> None:
    org = tenants.a.org
    assert_fly_error(
        api.post("/v1/tokens", json={"org_slug": org, "expires_in": "1y"}), 422, "expires_in"
    )
    assert_fly_error(api.post("/v1/tokens", json={"org_slug": unique("none")}), 404, "org")
    foreign_app = {"org_slug": org, "app_name": tenants.b.app}
    assert_fly_error(api.post("/v1/tokens", json=foreign_app), 404, tenants.b.app)
    assert_fly_error(api.delete("/v1/tokens/tok_nothing"), 404, "tok_nothing")


def test_requests_without_a_valid_token_are_401_and_say_how(api_server: InProcessServer) -> None:
    with api_server.client(anonymous=True) as client:
        anonymous = client.get("/v1/apps")
        openapi = client.get("/openapi.json")
    assert_fly_error(anonymous, 401, "Bearer")
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert openapi.status_code == 200


def test_first_start_writes_an_operator_token_readable_by_its_owner_only(
    api_server: InProcessServer,
) -> None:
    path = api_server.home / OPERATOR_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with api_server.client() as client:
        assert client.get("/v1/orgs").status_code == 200


def tokens_of(home: Path) -> TokenService:
    database = home / DATABASE
    return TokenService(SqliteTenancyStore(database), SqliteMachineStore(database), ManualClock())


def test_bootstrap_mints_once_and_init_replaces_the_file_token(tmp_path: Path) -> None:
    tokens = tokens_of(tmp_path)
    first = bootstrap_operator_token(tmp_path / OPERATOR_TOKEN_FILE, tokens)
    assert first is not None
    assert (tmp_path / OPERATOR_TOKEN_FILE).read_text().strip() == first
    assert bootstrap_operator_token(tmp_path / OPERATOR_TOKEN_FILE, tokens) is None
    _admin, admin_secret = tokens.issue_operator("hangar admin")
    renewed = bootstrap_operator_token(tmp_path / OPERATOR_TOKEN_FILE, tokens, renew=True)
    assert renewed is not None and renewed != first
    assert (tmp_path / OPERATOR_TOKEN_FILE).read_text().strip() == renewed
    assert tokens.authenticate(renewed).description == BOOTSTRAP_TOKEN_DESCRIPTION
    assert tokens.authenticate(admin_secret).description == "hangar admin"
    with pytest.raises(Unauthenticated, match="revoked"):
        tokens.authenticate(first)
    active = sorted(token.description for token in tokens.active_operator_tokens())
    assert active == sorted([BOOTSTRAP_TOKEN_DESCRIPTION, "hangar admin"])
