"""How routers reach the services (one container on the app's state) and the caller's access
(which the request guard put in the request's scope)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from hangar.api.access import Access
from hangar.api.guard import ACCESS_KEY
from hangar.api.services.apps import AppService
from hangar.api.services.audit import AuditService
from hangar.api.services.hosts import HostService
from hangar.api.services.llm import LlmService
from hangar.api.services.machines import MachineService
from hangar.api.services.orgs import OrgService
from hangar.api.services.platform import PlatformService
from hangar.api.services.secrets import SecretService
from hangar.api.services.tokens import TokenService
from hangar.api.services.usage import UsageService
from hangar.api.services.volumes import VolumeService
from hangar.errors import Unauthenticated
from hangar.metrics import HangarMetrics


@dataclass
class Services:
    apps: AppService
    machines: MachineService
    orgs: OrgService
    tokens: TokenService
    audit: AuditService
    hosts: HostService
    platform: PlatformService
    secrets: SecretService
    usage: UsageService
    metrics: HangarMetrics
    volumes: VolumeService
    llm: LlmService


def services(request: Request) -> Services:
    container: Services = request.app.state.services
    return container


def access(request: Request) -> Access:
    granted = request.scope.get(ACCESS_KEY)
    if not isinstance(granted, Access):
        raise Unauthenticated("request did not pass the guard")
    return granted


ServicesDep = Annotated[Services, Depends(services)]
AccessDep = Annotated[Access, Depends(access)]
LeaseNonce = Annotated[str | None, Header(alias="fly-machine-lease-nonce")]
