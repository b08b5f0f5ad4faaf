"""Tokens and the access policy on a real SQLite store and a manual clock."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from hangar.api.access import AccessPolicy
from hangar.api.scopes import Scope
from hangar.api.services.tokens import TokenService
from hangar.clock import ManualClock
from hangar.errors import Forbidden, NotFound, Unauthenticated
from hangar.model.duration import MAX_TOKEN_LIFETIME_S, parse_duration
from hangar.store.machines import SqliteMachineStore
from hangar.store.tenancy import SqliteTenancyStore


@dataclass
class World:
    clock: ManualClock
    tokens: TokenService
    policy: AccessPolicy
    database: Path


@pytest.fixture
def world(tmp_path: Path) -> World:
    database = tmp_path / "hangar.db"
    clock = ManualClock()
    cluster = SqliteMachineStore(database)
    tenancy = SqliteTenancyStore(database)
    for org, app in (("acme", "web"), ("acme", "api"), ("rival", "shop")):
        tenancy.ensure_org(org, clock.now())
        cluster.create_app(app, org, clock.now())
    tokens = TokenService(tenancy, cluster, clock)
    return World(clock, tokens, AccessPolicy(tokens, cluster), database)


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


def test_secrets_are_random_shown_once_and_stored_only_as_their_hash(world: World) -> None:
    token, secret = world.tokens.issue("acme", description="ci")
    _other, other_secret = world.tokens.issue("acme")
    assert secret != other_secret and secret.startswith("hgr_") and len(secret) > 40
    rows = sqlite3.connect(world.database).execute("SELECT * FROM api_tokens").fetchall()
    stored = "".join(str(value) for row in rows for value in row)
    assert secret not in stored
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    assert world.policy.authenticate(bearer(secret)) == token


def test_expired_revoked_unknown_and_malformed_tokens_are_401(world: World) -> None:
    token, secret = world.tokens.issue("acme", ttl_s=24 * 3600)
    world.clock.advance(24 * 3600 - 1)
    assert world.policy.authenticate(bearer(secret)).id == token.id
    world.clock.advance(1)
    with pytest.raises(Unauthenticated, match="expired"):
        world.policy.authenticate(bearer(secret))
    revoked, revoked_secret = world.tokens.issue("acme")
    world.tokens.revoke(revoked.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        world.policy.authenticate(bearer(revoked_secret))
    for header in (None, "", "Bearer", "Bearer  ", "Basic abc", "hgr_abc", bearer("hgr_unknown")):
        with pytest.raises(Unauthenticated):
            world.policy.authenticate(header)


def test_ttls_are_bounded() -> None:
    def lifetime(text: str) -> float:
        return parse_duration(text, maximum=MAX_TOKEN_LIFETIME_S, minimum=1.0)

    assert lifetime("90s") == 90
    assert lifetime("7d") == 7 * 86400
    assert lifetime("1.5h") == 5400
    for text in ("0s", "24", "1y", "-1h", "367d"):
        with pytest.raises(ValueError):
            lifetime(text)


def test_tokens_are_issued_only_for_existing_orgs_and_their_own_apps(world: World) -> None:
    with pytest.raises(NotFound):
        world.tokens.issue("nobody")
    with pytest.raises(NotFound):
        world.tokens.issue("acme", app_name="shop")


def test_the_policy_hides_other_orgs_and_refuses_what_a_token_lacks(world: World) -> None:
    org, _ = world.tokens.issue("acme")
    read_only, _ = world.tokens.issue("acme", read_only=True)
    app, _ = world.tokens.issue("acme", app_name="web")
    operator, _ = world.tokens.issue_operator("test")
    authorize = world.policy.authorize
    assert authorize(org, Scope.APP_WRITE, {"app_name": "web"}).org_slug == "acme"
    assert authorize(operator, Scope.APP_WRITE, {"app_name": "shop"}).org_slug == "rival"
    with pytest.raises(NotFound, match="app shop not found"):
        authorize(org, Scope.APP_READ, {"app_name": "shop"})
    with pytest.raises(NotFound, match="app ghost not found"):
        authorize(operator, Scope.APP_READ, {"app_name": "ghost"})
    with pytest.raises(Forbidden, match="read-only"):
        authorize(read_only, Scope.APP_WRITE, {"app_name": "web"})
    assert authorize(read_only, Scope.APP_READ, {"app_name": "web"}).app is not None
    with pytest.raises(Forbidden, match="app web only"):
        authorize(app, Scope.APP_READ, {"app_name": "api"})
    with pytest.raises(Forbidden):
        authorize(app, Scope.ORG_READ, {})
    with pytest.raises(Forbidden):
        authorize(org, Scope.OPERATOR, {})
    with pytest.raises(Forbidden):
        authorize(read_only, Scope.ORG_WRITE, {})
    access = authorize(org, Scope.ORG_READ, {})
    with pytest.raises(NotFound, match="org rival not found"):
        access.require_org("rival")
    access.require_org("acme")
