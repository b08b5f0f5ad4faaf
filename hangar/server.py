"""``hangar server``: API + scheduler + agent in one process, state in SQLite under $HANGAR_HOME."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from hangar.agent.agent import Agent
from hangar.agent.gpus import HostGpus
from hangar.agent.platform import GuestPlatform
from hangar.api.access import AccessPolicy
from hangar.api.app import create_app
from hangar.api.deps import Services
from hangar.api.guard import MAX_BODY_BYTES, GuardConfig
from hangar.api.ratelimit import RateLimiter, RateLimits
from hangar.api.services.apps import AppService
from hangar.api.services.audit import AuditService
from hangar.api.services.hosts import HostService
from hangar.api.services.image_policy import ImagePolicy, default_oci_dirs
from hangar.api.services.machines import MachineService
from hangar.api.services.orgs import DEFAULT_ORG, OrgService
from hangar.api.services.platform import PlatformService
from hangar.api.services.quotas import QuotaService
from hangar.api.services.tokens import TokenService
from hangar.cli.client import OPERATOR_TOKEN_FILE
from hangar.clock import Clock, SystemClock
from hangar.model.host import HostInfo, read_local_host
from hangar.store.sqlite import SqliteStore
from hangar.store.tenancy import SqliteTenancyStore

log = logging.getLogger(__name__)

DEFAULT_PORT = 4280
DEFAULT_REGION = "local"
DATABASE = "hangar.db"
BOOTSTRAP_TOKEN_DESCRIPTION = "operator.token file"
RATE_LIMITS_ENV = "HANGAR_RATE_LIMITS"
MAX_BODY_ENV = "HANGAR_MAX_REQUEST_BYTES"


@dataclass
class EmbeddedServer:
    home: Path
    store: SqliteStore
    tenancy: SqliteTenancyStore
    tokens: TokenService
    agent: Agent
    host: HostInfo
    app: FastAPI


def build_server(
    home: Path,
    platform: GuestPlatform | None = None,
    clock: Clock | None = None,
    region: str | None = None,
    rate_limits: RateLimits | None = None,
) -> EmbeddedServer:
    """Everything ``hangar server`` runs; ``rate_limits`` defaults to HANGAR_RATE_LIMITS
    (Fly's documented limits where it names none)."""
    clock = clock or SystemClock()
    home.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(home / DATABASE)
    tenancy = SqliteTenancyStore(home / DATABASE)
    for org_slug in {DEFAULT_ORG} | {app.org_slug for app in store.list_apps(None)}:
        tenancy.ensure_org(org_slug, clock.now())
    if platform is None:
        from hangar.agent.guest import QemuGuestPlatform

        platform = QemuGuestPlatform.for_home(home)
    host = read_local_host(region or os.environ.get("HANGAR_REGION", DEFAULT_REGION))
    agent = Agent(store, platform, clock, home / "machines", HostGpus.from_environment(host.id))
    quotas = QuotaService(store, tenancy)
    capacity = PlatformService(store, host)
    orgs = OrgService(tenancy, quotas, clock)
    tokens = TokenService(tenancy, store, clock)
    audit = AuditService(tenancy, clock)
    services = Services(
        apps=AppService(store, tenancy, orgs, clock),
        machines=MachineService(
            store, agent, clock, host, quotas, ImagePolicy(default_oci_dirs(home)), capacity
        ),
        orgs=orgs,
        tokens=tokens,
        audit=audit,
        hosts=HostService(agent, host),
        platform=capacity,
    )
    guard = GuardConfig(
        policy=AccessPolicy(tokens, store),
        limiter=RateLimiter(
            rate_limits or RateLimits.parse(os.environ.get(RATE_LIMITS_ENV, "")), clock
        ),
        audit=audit,
        max_body_bytes=int(os.environ.get(MAX_BODY_ENV, MAX_BODY_BYTES)),
    )
    app = create_app(services, guard, on_startup=agent.start, on_shutdown=agent.close)
    return EmbeddedServer(
        home=home, store=store, tenancy=tenancy, tokens=tokens, agent=agent, host=host, app=app
    )


def write_operator_token(home: Path, secret: str) -> Path:
    """``$HANGAR_HOME/operator.token``, readable by its owner alone from the first byte."""
    path = home / OPERATOR_TOKEN_FILE
    scratch = path.with_suffix(".tmp")
    scratch.unlink(missing_ok=True)
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as token_file:
        token_file.write(secret + "\n")
    scratch.replace(path)
    return path


def bootstrap_operator_token(home: Path, tokens: TokenService, renew: bool = False) -> str | None:
    """On a first start (no operator token yet), or with ``renew`` (``hangar server --init``,
    which also revokes the previous file's token): mint an operator token and write it to
    ``$HANGAR_HOME/operator.token``. Returns the secret when it minted one."""
    active = tokens.active_operator_tokens()
    if active and not renew:
        return None
    if renew:
        for token in active:
            if token.description == BOOTSTRAP_TOKEN_DESCRIPTION:
                tokens.revoke(token.id)
    _token, secret = tokens.issue_operator(BOOTSTRAP_TOKEN_DESCRIPTION)
    write_operator_token(home, secret)
    return secret


def serve(home: Path, host: str, port: int, init: bool = False) -> None:
    import uvicorn

    server = build_server(home)
    secret = bootstrap_operator_token(home, server.tokens, renew=init)
    if secret is not None:
        log.info("operator token written to %s", home / OPERATOR_TOKEN_FILE)
        if init:
            print(f"operator token (also written to {home / OPERATOR_TOKEN_FILE}):")
            print(secret, flush=True)
    log.info("hangar server: home %s, listening on %s:%d", home, host, port)
    uvicorn.run(server.app, host=host, port=port, log_level="info")
