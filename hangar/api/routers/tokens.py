from __future__ import annotations

from fastapi import APIRouter, Query

from hangar.api.deps import AccessDep, ServicesDep
from hangar.api.schemas import CreateTokenRequest, TokenCreated, TokenList, TokenView
from hangar.api.scopes import Scope, requires

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=201)
@requires(Scope.OPERATOR)
async def create_token(
    services: ServicesDep, access: AccessDep, body: CreateTokenRequest
) -> TokenCreated:
    created = services.tokens.create(body)
    access.note(org=body.org_slug, token_id=created.id)
    return created


@router.get("")
@requires(Scope.OPERATOR)
async def list_tokens(
    services: ServicesDep, org_slug: str | None = Query(None, max_length=63)
) -> TokenList:
    return services.tokens.list_view(org_slug)


@router.delete("/{token_id}")
@requires(Scope.OPERATOR)
async def revoke_token(services: ServicesDep, access: AccessDep, token_id: str) -> TokenView:
    revoked = services.tokens.view(services.tokens.revoke(token_id))
    access.note(org=revoked.org_slug or "")
    return revoked
