from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from hangar.api.deps import AccessDep, LeaseNonce, ServicesDep
from hangar.api.schemas import (
    CreateMachineRequest,
    LeaseRequest,
    LeaseView,
    MachinePage,
    MachineView,
    MetadataValue,
    OkResponse,
    SignalRequest,
    StopRequest,
    UpdateMachineRequest,
)
from hangar.api.scopes import Scope, requires
from hangar.model.machine import MachineEvent
from hangar.model.run import RunRecord

router = APIRouter(prefix="/v1/apps/{app_name}/machines", tags=["machines"])


@router.get("")
@requires(Scope.APP_READ)
async def list_machines(
    services: ServicesDep,
    request: Request,
    response: Response,
    app_name: str,
    include_deleted: bool = False,
    region: str | None = Query(None, max_length=32),
    state: str | None = Query(None, max_length=128),
    limit: str | None = Query(None, max_length=32),
    after: str | None = Query(None, max_length=64),
) -> list[MachineView]:
    """The app's machines, oldest first: all of them, or a page with ``limit`` (1-1000) and
    ``after`` (the last id of the page before); a ``Link: <...>; rel="next"`` header names
    the next page while there is one."""
    page = MachinePage.parse(limit, after)
    services.apps.require(app_name)
    metadata = {
        key.removeprefix("metadata."): value
        for key, value in request.query_params.items()
        if key.startswith("metadata.")
    }
    views, next_after = services.machines.list_views(
        app_name, include_deleted, state, region, metadata, page
    )
    if page is not None and next_after is not None:
        following = request.url.include_query_params(after=next_after)
        response.headers["Link"] = f'<{following.path}?{following.query}>; rel="next"'
    return views


@router.post("")
@requires(Scope.APP_WRITE)
async def create_machine(
    services: ServicesDep, access: AccessDep, app_name: str, body: CreateMachineRequest
) -> MachineView:
    services.apps.require(app_name)
    machine = services.machines.create(app_name, body, actor=access.actor)
    access.note(machine_id=machine.id)
    return machine


@router.get("/{machine_id}")
@requires(Scope.APP_READ)
async def get_machine(services: ServicesDep, app_name: str, machine_id: str) -> MachineView:
    return services.machines.view(services.machines.require(app_name, machine_id))


@router.post("/{machine_id}")
@requires(Scope.APP_WRITE)
async def update_machine(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    body: UpdateMachineRequest,
    nonce: LeaseNonce = None,
) -> MachineView:
    return services.machines.update(app_name, machine_id, body, nonce)


@router.post("/{machine_id}/start")
@requires(Scope.APP_WRITE)
async def start_machine(
    services: ServicesDep, app_name: str, machine_id: str, nonce: LeaseNonce = None
) -> dict[str, str]:
    return services.machines.start(app_name, machine_id, nonce)


@router.post("/{machine_id}/stop")
@requires(Scope.APP_WRITE)
async def stop_machine(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    body: Annotated[StopRequest | None, Body()] = None,
    nonce: LeaseNonce = None,
) -> OkResponse:
    services.machines.stop(app_name, machine_id, body or StopRequest(), nonce)
    return OkResponse()


@router.post("/{machine_id}/restart")
@requires(Scope.APP_WRITE)
async def restart_machine(
    services: ServicesDep, app_name: str, machine_id: str, nonce: LeaseNonce = None
) -> OkResponse:
    services.machines.restart(app_name, machine_id, nonce)
    return OkResponse()


@router.post("/{machine_id}/signal")
@requires(Scope.APP_WRITE)
async def signal_machine(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    body: SignalRequest,
    nonce: LeaseNonce = None,
) -> OkResponse:
    await services.machines.signal(app_name, machine_id, body.signal, nonce)
    return OkResponse()


@router.delete("/{machine_id}")
@requires(Scope.APP_WRITE)
async def destroy_machine(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    force: bool = False,
    nonce: LeaseNonce = None,
) -> OkResponse:
    services.machines.destroy(app_name, machine_id, force, nonce)
    return OkResponse()


@router.get("/{machine_id}/wait")
@requires(Scope.APP_READ)
async def wait_machine(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    state: str = Query("started", max_length=32),
    timeout: int = Query(60, ge=1, le=60),
    instance_id: str | None = Query(None, max_length=64),
) -> dict[str, Any]:
    return await services.machines.wait(app_name, machine_id, state, timeout, instance_id)


@router.get("/{machine_id}/events")
@requires(Scope.APP_READ)
async def machine_events(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    limit: int | None = Query(None, ge=1, le=1000),
) -> list[MachineEvent]:
    return services.machines.events(app_name, machine_id, limit)


@router.get("/{machine_id}/runs")
@requires(Scope.APP_READ)
async def machine_runs(services: ServicesDep, app_name: str, machine_id: str) -> list[RunRecord]:
    return services.machines.runs(app_name, machine_id)


@router.get("/{machine_id}/logs", response_class=PlainTextResponse)
@requires(Scope.APP_READ)
async def machine_logs(
    services: ServicesDep, app_name: str, machine_id: str, follow: bool = False
) -> Response:
    stream, slot = services.machines.console(app_name, machine_id, follow)
    background = BackgroundTask(slot.release) if slot is not None else None
    return StreamingResponse(stream, media_type="text/plain", background=background)


@router.get("/{machine_id}/metadata")
@requires(Scope.APP_READ)
async def get_metadata(services: ServicesDep, app_name: str, machine_id: str) -> dict[str, str]:
    return services.machines.get_metadata(app_name, machine_id)


@router.post("/{machine_id}/metadata/{key}", status_code=204)
@requires(Scope.APP_WRITE)
async def set_metadata(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    key: str,
    body: MetadataValue,
    nonce: LeaseNonce = None,
) -> Response:
    services.machines.set_metadata(app_name, machine_id, key, body.value, nonce)
    return Response(status_code=204)


@router.delete("/{machine_id}/metadata/{key}", status_code=204)
@requires(Scope.APP_WRITE)
async def delete_metadata(
    services: ServicesDep, app_name: str, machine_id: str, key: str, nonce: LeaseNonce = None
) -> Response:
    services.machines.set_metadata(app_name, machine_id, key, None, nonce)
    return Response(status_code=204)


@router.post("/{machine_id}/lease")
@requires(Scope.APP_WRITE)
async def acquire_lease(
    services: ServicesDep,
    access: AccessDep,
    app_name: str,
    machine_id: str,
    body: Annotated[LeaseRequest | None, Body()] = None,
    nonce: LeaseNonce = None,
) -> LeaseView:
    return services.machines.acquire_lease(
        app_name, machine_id, body or LeaseRequest(), nonce, owner=access.actor
    )


@router.get("/{machine_id}/lease")
@requires(Scope.APP_READ)
async def get_lease(services: ServicesDep, app_name: str, machine_id: str) -> LeaseView:
    return services.machines.get_lease(app_name, machine_id)


@router.delete("/{machine_id}/lease")
@requires(Scope.APP_WRITE)
async def release_lease(
    services: ServicesDep, app_name: str, machine_id: str, nonce: LeaseNonce = None
) -> OkResponse:
    services.machines.release_lease(app_name, machine_id, nonce)
    return OkResponse()
