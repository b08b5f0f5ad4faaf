"""How routers reach the services: one container on the app's state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from hangar.api.services.apps import AppService
from hangar.api.services.machines import MachineService


@dataclass
class Services:
    apps: AppService
    machines: MachineService


def services(request: Request) -> Services:
    container: Services = request.app.state.services
    return container


ServicesDep = Annotated[Services, Depends(services)]
LeaseNonce = Annotated[str | None, Header(alias="fly-machine-lease-nonce")]
