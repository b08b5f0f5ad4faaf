"""The Machines API's machine routes (``/v1/apps/{app_name}/machines``), as Fly has them.

Responses that carry machines and events leave out what Fly leaves out (``exclude_none``):
``private_ip`` and ``nonce`` when there are none, an event's ``request`` but on exits.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask

from hangar.api.deps import AccessDep, LeaseNonce, ServicesDep
from hangar.api.schemas import (
    CreateMachineRequest,
    EventView,
    ExecRequest,
    ExecResponse,
    LeaseRequest,
    LeaseView,
    MachinePage,
    MachineVersionView,
    MachineView,
    MetadataUpdate,
    MetadataValue,
    OkResponse,
    ProcessStat,
    SignalRequest,
    StartResponse,
    StopRequest,
    UpdateMachineRequest,
    WaitResponse,
    fly_event,
)
from hangar.api.scopes import Scope, requires
from hangar.api.services.machines import wait_timeout_s
from hangar.model.run import RunRecord

router = APIRouter(prefix="/v1/apps/{app_name}/machines", tags=["machines"])


@router.get("", response_model_exclude_none=True)
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


@router.post("", response_model_exclude_none=True)
@requires(Scope.APP_WRITE)
async def create_machine(
    services: ServicesDep, access: AccessDep, app_name: str, body: CreateMachineRequest
) -> MachineView:
    services.apps.require(app_name)
    machine = services.machines.create(app_name, body, actor=access.actor)
    access.note(machine_id=machine.id)
    return machine


@router.get("/{machine_id}", response_model_exclude_none=True)
@requires(Scope.APP_READ)
async def get_machine(services: ServicesDep, app_name: str, machine_id: str) -> MachineView:
    return services.machines.view(services.machines.require(app_name, machine_id))


@router.post("/{machine_id}", response_model_exclude_none=True)
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
) -> StartResponse:
    """Starts a stopped machine, or resumes a suspended one where it was."""
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


@router.post("/{machine_id}/suspend")
@requires(Scope.APP_WRITE)
async def suspend_machine(
    services: ServicesDep, app_name: str, machine_id: str, nonce: LeaseNonce = None
) -> OkResponse:
    """Saves the guest's memory and devices and ends its VMM; ``start`` resumes it."""
    services.machines.suspend(app_name, machine_id, nonce)
    return OkResponse()


@router.post("/{machine_id}/restart")
@requires(Scope.APP_WRITE)
async def restart_machine(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    nonce: LeaseNonce = None,
    signal: str | None = Query(None, max_length=16),
    timeout: str | None = Query(None, max_length=64),
    force_stop: bool = False,
) -> OkResponse:
    timeout = "0s" if force_stop else timeout
    services.machines.restart(app_name, machine_id, nonce, signal=signal, timeout=timeout)
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
    kill: bool = False,
    nonce: LeaseNonce = None,
) -> OkResponse:
    """``force`` (or ``kill``, as flaps sends it) stops a running machine without waiting."""
    services.machines.destroy(app_name, machine_id, force or kill, nonce)
    return OkResponse()


@router.get("/{machine_id}/wait")
@requires(Scope.APP_READ)
async def wait_machine(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    state: Annotated[list[str] | None, Query(max_length=8)] = None,
    timeout: str | None = Query(None, max_length=32),
    instance_id: str | None = Query(None, max_length=64),
    from_event_id: str | None = Query(None, max_length=64),
    version: str | None = Query(None, max_length=64),
) -> WaitResponse:
    """Until the machine is in any of the ``state`` values (given once or more)."""
    return await services.machines.wait(
        app_name,
        machine_id,
        [item[:64] for item in state or []],
        wait_timeout_s(timeout),
        instance_id,
        from_event_id,
        version,
    )


@router.get("/{machine_id}/events", response_model_exclude_none=True)
@requires(Scope.APP_READ)
async def machine_events(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    limit: int | None = Query(None, ge=1, le=1000),
) -> list[EventView]:
    return [fly_event(e) for e in services.machines.events(app_name, machine_id, limit)]


@router.get("/{machine_id}/versions")
@requires(Scope.APP_READ)
async def machine_versions(
    services: ServicesDep, app_name: str, machine_id: str
) -> list[MachineVersionView]:
    return services.machines.versions(app_name, machine_id)


@router.post("/{machine_id}/cordon")
@requires(Scope.APP_WRITE)
async def cordon_machine(
    services: ServicesDep, app_name: str, machine_id: str, nonce: LeaseNonce = None
) -> OkResponse:
    """Out of the proxy's rotation; it runs on as before."""
    services.machines.set_cordoned(app_name, machine_id, True, nonce)
    return OkResponse()


@router.post("/{machine_id}/uncordon")
@requires(Scope.APP_WRITE)
async def uncordon_machine(
    services: ServicesDep, app_name: str, machine_id: str, nonce: LeaseNonce = None
) -> OkResponse:
    services.machines.set_cordoned(app_name, machine_id, False, nonce)
    return OkResponse()


@router.post("/{machine_id}/exec")
@requires(Scope.APP_WRITE)
async def exec_in_machine(
    services: ServicesDep, app_name: str, machine_id: str, body: ExecRequest
) -> ExecResponse:
    """Runs a command inside the guest (its own channel; never on the host)."""
    return await services.machines.exec(app_name, machine_id, body)


@router.get("/{machine_id}/ps")
@requires(Scope.APP_READ)
async def machine_processes(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    sort_by: str | None = Query(None, max_length=32),
    order: str | None = Query(None, max_length=8),
) -> list[ProcessStat]:
    return await services.machines.processes(app_name, machine_id, sort_by, order)


@router.get("/{machine_id}/runs")
@requires(Scope.APP_READ)
async def machine_runs(services: ServicesDep, app_name: str, machine_id: str) -> list[RunRecord]:
    return services.machines.runs(app_name, machine_id)


@router.get("/{machine_id}/logs", response_class=PlainTextResponse)
@requires(Scope.APP_READ)
async def machine_logs(
    services: ServicesDep, app_name: str, machine_id: str, follow: bool = False
) -> Response:
    stream, slot = await services.machines.console(app_name, machine_id, follow)
    background = BackgroundTask(slot.release) if slot is not None else None
    return StreamingResponse(stream, media_type="text/plain", background=background)


@router.get("/{machine_id}/metadata")
@requires(Scope.APP_READ)
async def get_metadata(services: ServicesDep, app_name: str, machine_id: str) -> dict[str, str]:
    return services.machines.get_metadata(app_name, machine_id)


@router.patch("/{machine_id}/metadata")
@requires(Scope.APP_WRITE)
async def update_metadata(
    services: ServicesDep,
    app_name: str,
    machine_id: str,
    body: MetadataUpdate,
    nonce: LeaseNonce = None,
) -> dict[str, str]:
    """Several keys at once: set, or removed where ``""`` or ``null``; the metadata after."""
    return services.machines.update_metadata(app_name, machine_id, body.metadata, nonce)


@router.get("/{machine_id}/metadata/{key}")
@requires(Scope.APP_READ)
async def get_metadata_value(
    services: ServicesDep, app_name: str, machine_id: str, key: str
) -> MetadataValue:
    return MetadataValue(value=services.machines.get_metadata_value(app_name, machine_id, key))


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
    ttl: int | None = Query(None, ge=1, le=3600),
) -> LeaseView:
    """``?ttl=N`` (as flaps asks, with no body) or the body's ``ttl``; 30 s by default."""
    return services.machines.acquire_lease(
        app_name, machine_id, body or LeaseRequest(), nonce, owner=access.actor, ttl=ttl
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
