"""Hosts and their GPUs: operator routes (inventory, claim states, quarantine release)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict, Field

from hangar.api.deps import AccessDep, ServicesDep
from hangar.api.scopes import Scope, requires
from hangar.api.services.hosts import GpuView, HostGpusView, HostView
from hangar.model.gpu import GpuEvent

router = APIRouter(prefix="/v1/hosts", tags=["hosts"])


class QuarantineRelease(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=512)]


@router.get("")
@requires(Scope.OPERATOR)
async def list_hosts(services: ServicesDep) -> list[HostView]:
    return services.hosts.list_hosts()


@router.get("/{host_id}/gpus")
@requires(Scope.OPERATOR)
async def host_gpus(services: ServicesDep, host_id: str) -> HostGpusView:
    return services.hosts.gpus(host_id)


@router.get("/{host_id}/gpus/{bdf}/events")
@requires(Scope.OPERATOR)
async def gpu_events(services: ServicesDep, host_id: str, bdf: str) -> list[GpuEvent]:
    return await services.hosts.gpu_events(host_id, bdf)


@router.post("/{host_id}/gpus/{bdf}/release")
@requires(Scope.OPERATOR)
async def release_quarantine(
    services: ServicesDep,
    access: AccessDep,
    host_id: str,
    bdf: str,
    body: Annotated[QuarantineRelease, Body()],
) -> GpuView:
    access.note(host=host_id, gpu=bdf)
    return await services.hosts.release_quarantine(host_id, bdf, access.actor, body.reason)
