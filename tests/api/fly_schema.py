"""Fly's published description of the Machines API (January 2024), as hangar is held to it.

The description is older than Fly's Go client (fly-go), which is what flyctl and most tools
decode with; where the two differ the Go client wins (../shared/fly/README.md). Those
differences are the patch below, applied to the description before schemathesis reads it:
each entry is an RFC 6902 operation (``replace`` or ``add``) at a JSON pointer, with why.
The patch only ever states what fly-go decodes; it never loosens a type to let hangar pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DESCRIPTION_NAME = "machines-openapi-2024-01.yaml"
BASE_PATH = "/v1"
"""The description's server is ``https://api.machines.dev/v1``; its paths start at ``/apps``."""


@dataclass(frozen=True)
class PatchOp:
    op: str
    path: str
    value: Any
    why: str


def _schema(name: str) -> str:
    return f"/components/schemas/{name}"


def _path(path: str) -> str:
    return "/paths/" + path.replace("~", "~0").replace("/", "~1")


def _json_200(path: str, method: str) -> str:
    return f"{_path(path)}/{method}/responses/200/content/application~1json/schema"


EXIT_EVENT = {
    "type": "object",
    "properties": {
        "exit_code": {"type": "integer"},
        "guest_exit_code": {"type": "integer"},
        "guest_signal": {"type": "integer"},
        "oom_killed": {"type": "boolean"},
        "requested_stop": {"type": "boolean"},
        "restarting": {"type": "boolean"},
        "signal": {"type": "integer"},
        "exited_at": {"type": "string", "format": "date-time"},
    },
}
LEASE_DATA = {
    "type": "object",
    "properties": {
        "nonce": {"type": "string"},
        "expires_at": {"type": "integer"},
        "owner": {"type": "string"},
        "version": {"type": "string"},
    },
}
MACHINE_LEASE = {
    "type": "object",
    "properties": {
        "status": {"type": "string"},
        "data": LEASE_DATA,
        "message": {"type": "string"},
        "code": {"type": "string"},
    },
}
MACHINES = "/apps/{app_name}/machines/{machine_id}"

PATCH: tuple[PatchOp, ...] = (
    PatchOp(
        "replace",
        _schema("main.statusCode"),
        {"type": "string"},
        "fly-go's StatusCode is a plain string (it knows unknown, insufficient_capacity and "
        "name_taken); the 2024 enum lists two. An error's status names what went wrong.",
    ),
    PatchOp(
        "add",
        f"{_schema('Machine')}/properties/version",
        {"type": "string"},
        "fly-go's Machine.Version is a string: an integer breaks its decoding.",
    ),
    PatchOp(
        "add",
        f"{_schema('Machine')}/properties/cordoned",
        {"type": "boolean"},
        "fly-go's Machine.Cordoned.",
    ),
    PatchOp(
        "add",
        f"{_schema('Machine')}/properties/host_status",
        {"type": "string", "enum": ["ok", "unknown", "unreachable"]},
        "fly-go's HostStatus.",
    ),
    PatchOp(
        "replace",
        f"{_schema('MachineEvent')}/properties/request",
        {
            "type": "object",
            "properties": {"exit_event": EXIT_EVENT, "restart_count": {"type": "integer"}},
        },
        "fly-go's MachineRequest: an exit's exit_event (exited_at a time.Time, so RFC 3339; an "
        "integer there breaks the decoding of every machine that exited) and restart_count.",
    ),
    PatchOp(
        "replace",
        f"{_schema('ListApp')}/properties/network",
        {"type": "string"},
        "fly-go's App.Network is a string (the 2024 description says object).",
    ),
    *(
        PatchOp(
            "add",
            f"{_schema(name)}/properties/{field}",
            schema,
            f"fly-go's App.{field}.",
        )
        for name in ("App", "ListApp")
        for field, schema in (
            ("internal_numeric_id", {"type": "integer"}),
            ("network", {"type": "string"}),
            ("machine_count", {"type": "integer"}),
            ("volume_count", {"type": "integer"}),
        )
        if not (name == "ListApp" and field in ("network", "machine_count"))
    ),
    PatchOp(
        "replace",
        f"{_schema('api.MachineService')}/properties/autostop",
        {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["off", "stop", "suspend"]}]},
        "fly-go's MachineAutostop reads true/false and off/stop/suspend (suspend is newer than "
        "the description's boolean).",
    ),
    PatchOp(
        "replace",
        _json_200(f"{MACHINES}/lease", "get"),
        MACHINE_LEASE,
        "fly-go's MachineLease: {status, data: {nonce, expires_at, owner, version}, message, "
        "code}; the description has the bare lease.",
    ),
    PatchOp(
        "replace",
        _json_200(f"{MACHINES}/lease", "post"),
        MACHINE_LEASE,
        "As for GET .../lease.",
    ),
    PatchOp(
        "replace",
        _json_200(f"{MACHINES}/exec", "post"),
        {
            "type": "object",
            "properties": {
                "exit_code": {"type": "integer"},
                "stdout": {"type": "string"},
                "stderr": {"type": "string"},
            },
        },
        "fly-go's MachineExecResponse is an object; the description says a string.",
    ),
    PatchOp(
        "replace",
        f"{_path(MACHINES + '/wait')}/get/responses/200/content",
        {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "ok": {"type": "boolean"},
                        "state": {"type": "string"},
                        "event_id": {"type": "string"},
                        "version": {"type": "string"},
                    },
                }
            }
        },
        "The wait response fly clients read: {ok, state, event_id, version}.",
    ),
    PatchOp(
        "replace",
        f"{_path(MACHINES + '/start')}/post/responses/200/content",
        {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "status": {"type": "string"},
                        "previous_state": {"type": "string"},
                    },
                }
            }
        },
        "fly-go's MachineStartResponse.",
    ),
)


def _pointer(document: Any, pointer: str) -> tuple[Any, str]:
    parts = [part.replace("~1", "/").replace("~0", "~") for part in pointer.split("/")[1:]]
    for part in parts[:-1]:
        document = document[part]
    return document, parts[-1]


def apply_patch(description: dict[str, Any], patch: tuple[PatchOp, ...] = PATCH) -> dict[str, Any]:
    """The description with ``patch`` applied; ``replace`` needs what it replaces to exist,
    ``add`` needs its parent to."""
    patched = copy.deepcopy(description)
    for op in patch:
        parent, key = _pointer(patched, op.path)
        if op.op == "replace" and key not in parent:
            raise KeyError(f"nothing to replace at {op.path}")
        if op.op not in ("add", "replace"):
            raise ValueError(f"unsupported patch op {op.op}")
        parent[key] = copy.deepcopy(op.value)
    return patched


def load_description(path: Path) -> dict[str, Any]:
    description: dict[str, Any] = yaml.safe_load(path.read_text())
    return description
