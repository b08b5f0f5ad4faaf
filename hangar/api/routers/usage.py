"""An org's metered usage and its cost over a window."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from hangar.api.deps import AccessDep, ServicesDep
from hangar.api.scopes import Scope, requires
from hangar.api.services.usage import UsageReport
from hangar.model.usage import GroupBy

router = APIRouter(prefix="/v1/orgs", tags=["usage"])

INSTANT = "unix seconds or an RFC 3339 time"


@router.get("/{org_slug}/usage", response_model_by_alias=True)
@requires(Scope.ORG_READ)
async def org_usage(
    services: ServicesDep,
    access: AccessDep,
    org_slug: str,
    start: Annotated[
        str | None,
        Query(alias="from", max_length=64, description=f"{INSTANT} (default: 30 days before to)"),
    ] = None,
    end: Annotated[
        str | None, Query(alias="to", max_length=64, description=f"{INSTANT} (default: now)")
    ] = None,
    group_by: Annotated[GroupBy, Query()] = "app",
) -> UsageReport:
    """Seconds each group of the org's machines ran in ``[from, to)``, the resources they held
    in that time, and its cost at the operator's prices."""
    return services.usage.report(access, org_slug, start, end, group_by)
