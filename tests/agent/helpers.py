"""Shared helpers for tests that drive real machines through a real server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import httpx

from hangar.agent.guest import find_machine_processes
from hangar.agent.host import HostServices
from hangar.agent.operations import build_plan
from hangar.agent.placement import HostPlacement
from hangar.agent.platform import GuestPlatform
from hangar.model.host import HostInfo
from hangar.model.run import RunRequest
from hangar.net import links
from hangar.net.links import LinkNames, PortKind
from hangar.scheduler import InMemoryClaimStore
from hangar.server_process import ServerProcess
from hangar.settings import env_name
from hangar.store.protocol import GpuStore

BOOT_TIMEOUT_S = 180


def step_names(request: RunRequest) -> list[str]:
    """The names of the steps of ``request``'s plan, in order (building a plan touches none
    of the services its steps are built with)."""
    host = HostServices(
        platform=cast(GuestPlatform, object()),
        machines_dir=Path("/nonexistent"),
        placement=HostPlacement(
            InMemoryClaimStore(), HostInfo(id="h", region="r", cpus=1, memory_mb=1024)
        ),
        gpu_store=cast(GpuStore, object()),
    )
    return [step.name for step in build_plan(request, "m1", host).steps]


def machine_path(app_name: str, machine_id: str = "") -> str:
    return f"/v1/apps/{app_name}/machines" + (f"/{machine_id}" if machine_id else "")


def run_machine(
    api: httpx.Client, app_name: str, image: str, cmd: list[str] | None = None, **config: Any
) -> str:
    body: dict[str, Any] = {"image": image, "restart": {"policy": "no"}, **config}
    if cmd is not None:
        body["init"] = {"cmd": cmd}
    response = api.post(machine_path(app_name), json={"config": body})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def wait_state(
    api: httpx.Client, app_name: str, machine_id: str, state: str, timeout_s: float = BOOT_TIMEOUT_S
) -> dict[str, Any]:
    """Wait through the API's own ``wait`` (60 s a call), then return the machine."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = api.get(
            machine_path(app_name, machine_id) + "/wait",
            params={"state": state, "timeout": 60},
        )
        if response.status_code == 200:
            machine: dict[str, Any] = api.get(machine_path(app_name, machine_id)).json()
            return machine
        assert response.status_code == 408, response.text
        if time.monotonic() > deadline:
            current = api.get(machine_path(app_name, machine_id)).json()
            raise AssertionError(f"machine never reached {state}: {current}")


def exit_events(api: httpx.Client, app_name: str, machine_id: str) -> list[dict[str, Any]]:
    events = api.get(machine_path(app_name, machine_id) + "/events").json()
    return [event["request"]["exit_event"] for event in events if event["type"] == "exit"]


def wait_exit_recorded(
    api: httpx.Client,
    app_name: str,
    machine_id: str,
    count: int = 1,
    timeout_s: float = BOOT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        exits = exit_events(api, app_name, machine_id)
        if len(exits) >= count:
            return exits
        time.sleep(0.2)
    raise AssertionError(f"no {count} exit events for {machine_id}")


def vmm_pids(home: Path, machine_id: str) -> list[int]:
    return [
        pid
        for pid, owner in find_machine_processes(home / "machines").items()
        if owner == machine_id
    ]


def console_text(api: httpx.Client, app_name: str, machine_id: str) -> str:
    return api.get(machine_path(app_name, machine_id) + "/logs").text


def machine_port(server: ServerProcess, machine_id: str) -> tuple[PortKind | None, bool]:
    """The kind of the machine's port on the server's private network (None: it has none), and
    whether its network namespace exists."""
    names = LinkNames(server.extra_env[env_name("net_link_prefix")])
    state = links.port_state(names.tap(machine_id))
    return (
        state.kind if state is not None else None,
        links.namespace_exists(names.netns(machine_id)),
    )


def expected_port(tier: str, running: bool) -> tuple[PortKind | None, bool]:
    """What :func:`machine_port` says of a machine in ``tier``, running or not."""
    if not running:
        return None, False
    return (PortKind.VETH, True) if tier == "sandbox" else (PortKind.TAP, False)
