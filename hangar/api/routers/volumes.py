"""``/v1/apps/{app_name}/volumes``: Fly's volumes paths and shapes."""

from __future__ import annotations

from fastapi import APIRouter

from hangar.api.deps import AccessDep, ServicesDep
from hangar.api.scopes import Scope, requires
from hangar.api.volume_schemas import (
    CreateVolumeRequest,
    ExtendVolumeRequest,
    ExtendVolumeResponse,
    UpdateVolumeRequest,
    VolumeSnapshotView,
    VolumeView,
)

router = APIRouter(prefix="/v1/apps/{app_name}/volumes", tags=["volumes"])


@router.get("")
@requires(Scope.APP_READ)
async def list_volumes(
    services: ServicesDep, app_name: str, include_deleted: bool = False
) -> list[VolumeView]:
    services.apps.require(app_name)
    return await services.volumes.list_views(app_name, include_deleted)


@router.post("")
@requires(Scope.APP_WRITE)
async def create_volume(
    services: ServicesDep, access: AccessDep, app_name: str, body: CreateVolumeRequest
) -> VolumeView:
    services.apps.require(app_name)
    volume = await services.volumes.create(app_name, body)
    access.note(volume_id=volume.id)
    return volume


@router.get("/{volume_id}")
@requires(Scope.APP_READ)
async def get_volume(services: ServicesDep, app_name: str, volume_id: str) -> VolumeView:
    return await services.volumes.view(services.volumes.require(app_name, volume_id))


@router.post("/{volume_id}")
@requires(Scope.APP_WRITE)
async def update_volume(
    services: ServicesDep, app_name: str, volume_id: str, body: UpdateVolumeRequest
) -> VolumeView:
    return await services.volumes.update(app_name, volume_id, body)


@router.put("/{volume_id}/extend")
@requires(Scope.APP_WRITE)
async def extend_volume(
    services: ServicesDep, app_name: str, volume_id: str, body: ExtendVolumeRequest
) -> ExtendVolumeResponse:
    return await services.volumes.extend(app_name, volume_id, body)


@router.delete("/{volume_id}")
@requires(Scope.APP_WRITE)
async def delete_volume(services: ServicesDep, app_name: str, volume_id: str) -> VolumeView:
    return await services.volumes.delete(app_name, volume_id)


@router.get("/{volume_id}/snapshots")
@requires(Scope.APP_READ)
async def list_volume_snapshots(
    services: ServicesDep, app_name: str, volume_id: str
) -> list[VolumeSnapshotView]:
    return services.volumes.snapshots(app_name, volume_id)


@router.post("/{volume_id}/snapshots")
@requires(Scope.APP_WRITE)
async def create_volume_snapshot(
    services: ServicesDep, app_name: str, volume_id: str
) -> VolumeSnapshotView:
    return await services.volumes.snapshot(app_name, volume_id)
