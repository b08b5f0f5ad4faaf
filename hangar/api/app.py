"""The FastAPI application: routers and error mapping; nothing else here knows HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from hangar import __version__
from hangar.api.deps import Services
from hangar.api.errors import install_error_handlers
from hangar.api.routers import apps, machines


def create_app(
    services: Services,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
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
    return app
