from __future__ import annotations

from fastapi import APIRouter, Query

from hangar.api.deps import AccessDep, ServicesDep
from hangar.api.schemas import AuditList
from hangar.api.scopes import Scope, requires

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("")
@requires(Scope.ORG_READ)
async def list_audit(
    services: ServicesDep,
    access: AccessDep,
    org_slug: str | None = Query(None, max_length=63),
    limit: int = Query(100, ge=1, le=1000),
    before: int | None = Query(None, ge=1, le=2**62, description="only records older than seq"),
) -> AuditList:
    return services.audit.list(access, org_slug, limit, before)
