"""The FastAPI application: routers, the request guard and error mapping; nothing else here
knows HTTP."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp

from hangar import __version__
from hangar.api.deps import Services
from hangar.api.errors import install_error_handlers
from hangar.api.guard import GuardConfig, RequestGuard
from hangar.api.routers import (
    apps,
    audit,
    hosts,
    llm,
    machines,
    metrics,
    orgs,
    platform,
    secrets,
    tokens,
    usage,
    volumes,
)
from hangar.api.routetable import api_operations
from hangar.api.scopes import OPENAPI_EXTENSION

log = logging.getLogger(__name__)

BEARER_SCHEME = "bearer"
WEB_MOUNT = "/ui"


def create_app(
    services: Services,
    guard: GuardConfig,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    web: ASGIApp | None = None,
) -> FastAPI:
    """``web``: the dashboard, mounted at ``/ui`` (outside the API's route table: it signs
    in with a cookie and asks the same access policy itself)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        check_declared_scopes(_app)
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown()

    app = FastAPI(title="hangar Machines API", version=__version__, lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    app.include_router(apps.router)
    app.include_router(machines.router)
    app.include_router(secrets.router)
    app.include_router(volumes.router)
    app.include_router(orgs.router)
    app.include_router(tokens.router)
    app.include_router(audit.router)
    app.include_router(hosts.router)
    app.include_router(platform.router)
    app.include_router(usage.router)
    app.include_router(metrics.router)
    app.include_router(llm.router)
    if web is not None:
        app.mount(WEB_MOUNT, web)
    app.add_middleware(RequestGuard, routes=app.router.routes, config=guard)
    install_openapi(app)
    return app


def check_declared_scopes(app: FastAPI) -> None:
    """Every route says what it needs; one that does not is served to the operator only."""
    for operation in api_operations(app.router.routes):
        scope = operation.scope
        if scope is None:
            log.warning(
                "route %s %s declares no scope (hangar.api.scopes.requires): operator only",
                ",".join(sorted(operation.methods)),
                operation.path,
            )
        elif scope.on_app and "{app_name}" not in operation.path:
            raise RuntimeError(f"route {operation.path} declares {scope} but has no {{app_name}}")


def install_openapi(app: FastAPI) -> None:
    """The OpenAPI document names the bearer scheme and, on each operation, its scope."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            document.setdefault("components", {})["securitySchemes"] = {
                BEARER_SCHEME: {"type": "http", "scheme": "bearer"}
            }
            for operation in api_operations(app.router.routes):
                scope = operation.scope
                for method in operation.methods:
                    entry = document["paths"].get(operation.path, {}).get(method.lower())
                    if entry is not None and scope is not None:
                        entry[OPENAPI_EXTENSION] = str(scope)
                        entry["security"] = [{BEARER_SCHEME: []}]
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
