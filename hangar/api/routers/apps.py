from __future__ import annotations

from fastapi import APIRouter, Query, Response

from hangar.api.deps import ServicesDep
from hangar.api.schemas import AppList, AppView, CreateAppRequest

router = APIRouter(prefix="/v1/apps", tags=["apps"])


@router.get("")
async def list_apps(
    services: ServicesDep, org_slug: str | None = Query(None, max_length=63)
) -> AppList:
    return services.apps.list(org_slug)


@router.post("", status_code=201)
async def create_app(services: ServicesDep, body: CreateAppRequest) -> AppView:
    return services.apps.create(body)


@router.get("/{app_name}")
async def get_app(services: ServicesDep, app_name: str) -> AppView:
    return services.apps.view(services.apps.require(app_name))


@router.delete("/{app_name}", status_code=202)
async def delete_app(services: ServicesDep, app_name: str) -> Response:
    services.apps.delete(app_name)
    return Response(status_code=202)
