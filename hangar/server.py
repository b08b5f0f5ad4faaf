"""``hangar server``: API + scheduler + agent in one process, state in SQLite under $HANGAR_HOME."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from hangar.agent.agent import Agent
from hangar.agent.platform import GuestPlatform
from hangar.api.app import create_app
from hangar.api.deps import Services
from hangar.api.services.apps import AppService
from hangar.api.services.machines import MachineService
from hangar.clock import Clock, SystemClock
from hangar.model.host import HostInfo, read_local_host
from hangar.store.sqlite import SqliteStore

log = logging.getLogger(__name__)

DEFAULT_PORT = 4280
DEFAULT_REGION = "local"


@dataclass
class EmbeddedServer:
    home: Path
    store: SqliteStore
    agent: Agent
    host: HostInfo
    app: FastAPI


def build_server(
    home: Path,
    platform: GuestPlatform | None = None,
    clock: Clock | None = None,
    region: str | None = None,
) -> EmbeddedServer:
    clock = clock or SystemClock()
    home.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(home / "hangar.db")
    if platform is None:
        from hangar.agent.guest import QemuGuestPlatform

        platform = QemuGuestPlatform.for_home(home)
    host = read_local_host(region or os.environ.get("HANGAR_REGION", DEFAULT_REGION))
    agent = Agent(store, platform, clock, home / "machines")
    services = Services(
        apps=AppService(store, clock),
        machines=MachineService(store, agent, clock, host),
    )
    app = create_app(services, on_startup=agent.start, on_shutdown=agent.close)
    return EmbeddedServer(home=home, store=store, agent=agent, host=host, app=app)


def serve(home: Path, host: str, port: int) -> None:
    import uvicorn

    server = build_server(home)
    log.info("hangar server: home %s, listening on %s:%d", home, host, port)
    uvicorn.run(server.app, host=host, port=port, log_level="info")
