"""App secrets (``/v1/apps/{app_name}/secrets``), as Fly's current API has them: names and
digests out, values only in."""

from __future__ import annotations

from fastapi import APIRouter, Query

from hangar.api.deps import ServicesDep
from hangar.api.schemas import (
    SecretList,
    SecretSet,
    SecretsUpdated,
    SecretsVersion,
    SecretView,
    SetSecretRequest,
    UpdateSecretsRequest,
)
from hangar.api.scopes import Scope, requires

router = APIRouter(prefix="/v1/apps/{app_name}/secrets", tags=["secrets"])


@router.get("")
@requires(Scope.APP_READ)
async def list_secrets(
    services: ServicesDep,
    app_name: str,
    version: int | None = Query(None, ge=0),
    show_secrets: bool = False,
) -> SecretList:
    services.apps.require(app_name)
    return services.secrets.list(app_name, version, show_secrets)


@router.post("")
@requires(Scope.APP_WRITE)
async def update_secrets(
    services: ServicesDep, app_name: str, body: UpdateSecretsRequest
) -> SecretsUpdated:
    """Sets each value given, removes each given as ``null``: one new version."""
    services.apps.require(app_name)
    return services.secrets.update(app_name, body.values)


@router.get("/{name}")
@requires(Scope.APP_READ)
async def get_secret(
    services: ServicesDep,
    app_name: str,
    name: str,
    version: int | None = Query(None, ge=0),
    show_secrets: bool = False,
) -> SecretView:
    services.apps.require(app_name)
    return services.secrets.get(app_name, name, version, show_secrets)


@router.post("/{name}")
@requires(Scope.APP_WRITE)
async def set_secret(
    services: ServicesDep, app_name: str, name: str, body: SetSecretRequest
) -> SecretSet:
    services.apps.require(app_name)
    return services.secrets.set(app_name, name, body.value)


@router.delete("/{name}")
@requires(Scope.APP_WRITE)
async def unset_secret(services: ServicesDep, app_name: str, name: str) -> SecretsVersion:
    services.apps.require(app_name)
    return services.secrets.unset(app_name, name)
