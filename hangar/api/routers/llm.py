"""``/v1/orgs/{org_slug}/llm/deployments``: model deployments of an org (``hangar llm``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from hangar.api.deps import AccessDep, ServicesDep
from hangar.api.llm_schemas import ApiKeyCreated, DeploymentView
from hangar.api.scopes import Scope, requires
from hangar.model.llm import DeploymentSpec, ScaleSpec

router = APIRouter(prefix="/v1/orgs/{org_slug}/llm/deployments", tags=["llm"])


@router.post("", status_code=201)
@requires(Scope.ORG_WRITE)
async def create_deployment(
    services: ServicesDep,
    access: AccessDep,
    org_slug: str,
    body: Annotated[dict[str, Any], Body(description="a DeploymentSpec")],
) -> DeploymentView:
    # The org first: another org's answer is its 404 whatever the body holds.
    services.orgs.require(access, org_slug)
    try:
        spec = DeploymentSpec.model_validate(body)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors, body=body) from None
    return await services.llm.deploy(access, org_slug, spec)


@router.get("")
@requires(Scope.ORG_READ)
async def list_deployments(
    services: ServicesDep, access: AccessDep, org_slug: str
) -> list[DeploymentView]:
    return services.llm.list_views(access, org_slug)


@router.get("/{name}")
@requires(Scope.ORG_READ)
async def get_deployment(
    services: ServicesDep, access: AccessDep, org_slug: str, name: str
) -> DeploymentView:
    return services.llm.view(services.llm.require(access, org_slug, name))


@router.post("/{name}/scale")
@requires(Scope.ORG_WRITE)
async def scale_deployment(
    services: ServicesDep, access: AccessDep, org_slug: str, name: str, body: ScaleSpec
) -> DeploymentView:
    return await services.llm.scale(access, org_slug, name, body)


@router.delete("/{name}", status_code=204)
@requires(Scope.ORG_WRITE)
async def delete_deployment(
    services: ServicesDep, access: AccessDep, org_slug: str, name: str
) -> Response:
    await services.llm.destroy(access, org_slug, name)
    return Response(status_code=204)


@router.post("/{name}/keys", status_code=201)
@requires(Scope.ORG_WRITE)
async def create_deployment_key(
    services: ServicesDep, access: AccessDep, org_slug: str, name: str
) -> ApiKeyCreated:
    return await services.llm.create_key(access, org_slug, name)
