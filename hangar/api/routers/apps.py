from __future__ import annotations

from fastapi import APIRouter, Query, Response

from hangar.api.deps import AccessDep, ServicesDep
from hangar.api.schemas import AppList, AppView, CreateAppRequest
from hangar.api.scopes import Scope, requires

router = APIRouter(prefix="/v1/apps", tags=["apps"])


@router.get("")
@requires(Scope.ORG_READ)
async def list_apps(
    services: ServicesDep, access: AccessDep, org_slug: str | None = Query(None, max_length=63)
) -> AppList:
    return services.apps.list(access, org_slug)


@router.post("", status_code=201)
@requires(Scope.ORG_WRITE)
async def create_app(services: ServicesDep, access: AccessDep, body: CreateAppRequest) -> AppView:
    return services.apps.create(access, body)


@router.get("/{app_name}")
@requires(Scope.APP_READ)
async def get_app(services: ServicesDep, app_name: str) -> AppView:
    return services.apps.view(services.apps.require(app_name))


@router.delete("/{app_name}", status_code=202)
@requires(Scope.APP_WRITE)
async def delete_app(services: ServicesDep, app_name: str) -> Response:
    services.apps.delete(app_name)
    return Response(status_code=202)
