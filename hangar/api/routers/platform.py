"""Capacity questions, as Fly's platform endpoints answer them: nothing is claimed."""

from __future__ import annotations

from fastapi import APIRouter, Query

from hangar.api.deps import AccessDep, ServicesDep
from hangar.api.scopes import Scope, requires
from hangar.api.services.platform import PlacementsRequest, PlacementsView, RegionsView

router = APIRouter(prefix="/v1/platform", tags=["platform"])


@router.post("/placements")
@requires(Scope.ORG_READ)
async def dry_run_placements(
    services: ServicesDep, access: AccessDep, body: PlacementsRequest
) -> PlacementsView:
    """The operator is answered from what the hosts have left; an org within its quota, over
    the hosts as if empty (no org sees another's usage)."""
    return services.platform.placements(body, services.orgs.room_of(access))


@router.get("/regions")
@requires(Scope.ORG_READ)
async def regions(
    services: ServicesDep, access: AccessDep, gpu_kind: str | None = Query(None, max_length=64)
) -> RegionsView:
    return services.platform.regions(gpu_kind, services.orgs.room_of(access))
