from __future__ import annotations

from fastapi import APIRouter

from hangar.api.deps import AccessDep, ServicesDep
from hangar.api.schemas import CreateOrgRequest, OrgDetail, OrgList, QuotasRequest
from hangar.api.scopes import Scope, requires

router = APIRouter(prefix="/v1/orgs", tags=["orgs"])


@router.post("", status_code=201)
@requires(Scope.OPERATOR)
async def create_org(services: ServicesDep, access: AccessDep, body: CreateOrgRequest) -> OrgDetail:
    access.note(org=body.slug)
    return services.orgs.create(body)


@router.get("")
@requires(Scope.OPERATOR)
async def list_orgs(services: ServicesDep) -> OrgList:
    return services.orgs.list()


@router.get("/{org_slug}")
@requires(Scope.ORG_READ)
async def get_org(services: ServicesDep, access: AccessDep, org_slug: str) -> OrgDetail:
    return services.orgs.get(access, org_slug)


@router.put("/{org_slug}/quotas")
@requires(Scope.OPERATOR)
async def set_org_quotas(
    services: ServicesDep, access: AccessDep, org_slug: str, body: QuotasRequest
) -> OrgDetail:
    access.note(org=org_slug)
    return services.orgs.set_quotas(access, org_slug, body)
