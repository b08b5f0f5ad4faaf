"""The isolation matrix: every route x every kind of token, against org A's app and machine,
with org B as the neighbour. Rows come from the route table (a new route is in the matrix
as soon as it exists, and fails it until it declares its scope with ``requires``); the
expected answer of each cell comes from the scope rules below, written independently of
the server's policy.

- a refused cell must answer exactly as the rules say (401, 403 or 404), Fly-shaped;
- a 404 for another org's thing must be the very answer a thing that does not exist gets;
- an allowed cell must answer as the operator does (the probes are harmless: the machine is
  leased, bodies are incomplete), and that answer must not be a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hangar.api.routetable import api_operations
from hangar.api.scopes import OPENAPI_EXTENSION
from hangar.server import build_server
from hangar.settings import Settings
from tests.api.conftest import Tenants
from tests.api.helpers import assert_fly_error, unique
from tests.fixtures.inprocess import InProcessServer

ALLOW = "allow"
UNAUTHENTICATED = ("anonymous", "malformed", "unknown", "expired", "revoked")
TOKEN_KINDS = (
    *UNAUTHENTICATED,
    "operator",
    "org",
    "org_read_only",
    "app",
    "app_read_only",
    "other_app",
    "foreign_org",
    "foreign_org_read_only",
    "foreign_app",
)
APP_TOKENS = ("app", "app_read_only", "other_app", "foreign_app")
GHOST_MACHINE = "0123456789abcd"
# A probe must be harmless and quick; these would otherwise wait (``wait`` up to 60 s).
PROBE_QUERY: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/v1/apps/{app_name}/machines/{machine_id}/wait"): {"timeout": 0},
}


def expected(scope: str, kind: str, names_org: bool) -> int | str:
    """The rules of the issue, cell by cell."""
    if kind in UNAUTHENTICATED:
        return 401
    if kind == "operator":
        return ALLOW
    if scope == "operator":
        return 403
    if scope in ("app:read", "app:write"):
        if kind.startswith("foreign"):
            return 404
        if kind == "other_app":
            return 403
        if scope == "app:write" and kind.endswith("read_only"):
            return 403
        return ALLOW
    if kind in APP_TOKENS:
        return 403
    if scope == "org:write" and kind.endswith("read_only"):
        return 403
    if kind.startswith("foreign") and names_org:
        return 404
    return ALLOW


@dataclass(frozen=True)
class Names:
    org: str
    app: str
    machine: str


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: dict[str, Any]
    schemas: dict[str, Any]

    @property
    def scope(self) -> str | None:
        value = self.spec.get(OPENAPI_EXTENSION)
        return str(value) if value is not None else None

    def _parameters(self, where: str) -> set[str]:
        return {p["name"] for p in self.spec.get("parameters", []) if p["in"] == where}

    def _body_properties(self) -> set[str] | None:
        content = self.spec.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            return None
        schema = content["application/json"]["schema"]
        for option in schema.get("anyOf", [schema]):
            if "$ref" in option:
                name = option["$ref"].rsplit("/", 1)[-1]
                return set(self.schemas[name].get("properties", {}))
        return set()

    @property
    def names_org(self) -> bool:
        properties = self._body_properties() or set()
        return "org_slug" in self._parameters("path") | self._parameters("query") | properties

    @property
    def on_machine(self) -> bool:
        return "machine_id" in self._parameters("path")

    def request(self, names: Names) -> dict[str, Any]:
        fill = {"app_name": names.app, "machine_id": names.machine, "org_slug": names.org}
        path = self.path
        for name in self._parameters("path"):
            path = path.replace("{" + name + "}", fill.get(name, "probe"))
        params = {"org_slug": names.org} if "org_slug" in self._parameters("query") else {}
        params.update(PROBE_QUERY.get((self.method, self.path), {}))
        request: dict[str, Any] = {"method": self.method, "url": path, "params": params}
        properties = self._body_properties()
        if properties is not None:
            body: dict[str, Any] = {}
            if "org_slug" in properties:
                body["org_slug"] = names.org
            if "app_name" in properties:
                body["app_name"] = unique("matrix")
            request["json"] = body
        return request


def operations(document: dict[str, Any]) -> list[Operation]:
    schemas = document.get("components", {}).get("schemas", {})
    return [
        Operation(method.upper(), path, spec, schemas)
        for path, methods in document["paths"].items()
        for method, spec in methods.items()
    ]


@pytest.fixture(scope="module")
def openapi(api_server: InProcessServer) -> dict[str, Any]:
    with api_server.client(anonymous=True) as anonymous:
        response = anonymous.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def test_every_route_is_in_the_openapi_document_with_its_scope(
    openapi: dict[str, Any], tmp_path: Path
) -> None:
    """The matrix reads the OpenAPI document; nothing the server routes may be missing there,
    and every operation must have declared its scope."""
    served = build_server(Settings(home=tmp_path)).app
    routed = {
        (method, operation.path)
        for operation in api_operations(served.router.routes)
        for method in operation.methods
    }
    documented = {(operation.method, operation.path) for operation in operations(openapi)}
    assert routed == documented
    undeclared = [f"{op.method} {op.path}" for op in operations(openapi) if op.scope is None]
    assert not undeclared, f"declare a scope with hangar.api.scopes.requires on: {undeclared}"


@dataclass
class Cell:
    operation: Operation
    kind: str
    want: int | str
    got: int
    detail: str = ""

    def __str__(self) -> str:
        where = f"{self.operation.method} {self.operation.path}"
        return f"{where} [{self.kind}]: want {self.want}, got {self.got} {self.detail}".strip()


def test_isolation_matrix(
    openapi: dict[str, Any],
    tenants: Tenants,
    api_server: InProcessServer,
) -> None:
    a, b = tenants.a, tenants.b
    secrets = {
        "anonymous": None,
        "malformed": "Token not-a-bearer",
        "unknown": "hgr_" + "x" * 43,
        "expired": a.tokens["expired"],
        "revoked": a.tokens["revoked"],
        "operator": tenants.operator,
        "org": a.tokens["org"],
        "org_read_only": a.tokens["org_read_only"],
        "app": a.tokens["app"],
        "app_read_only": a.tokens["app_read_only"],
        "other_app": a.tokens["other_app"],
        "foreign_org": b.tokens["org"],
        "foreign_org_read_only": b.tokens["org_read_only"],
        "foreign_app": b.tokens["app"],
    }
    real = Names(org=a.org, app=a.app, machine=a.machine_id)
    ghost = Names(org=unique("ghost-org"), app=unique("ghost-app"), machine=GHOST_MACHINE)
    clients = {
        kind: api_server.client(secret, anonymous=secret is None)
        for kind, secret in secrets.items()
    }

    def leaks_a_secret(text: str) -> bool:
        return any(secret and secret in text for secret in secrets.values())

    wrong: list[Cell] = []
    cells = 0

    def send(kind: str, request: dict[str, Any]) -> httpx.Response:
        return clients[kind].request(**request)

    def unmask(response: httpx.Response, masked: Names) -> str:
        text = response.text
        for real_name, ghost_name in zip(
            (real.org, real.app, real.machine),
            (masked.org, masked.app, masked.machine),
            strict=True,
        ):
            text = text.replace(ghost_name, real_name)
        return text

    try:
        for operation in operations(openapi):
            assert operation.scope is not None, f"{operation.path} declares no scope"
            reference = send("operator", operation.request(real))
            assert reference.status_code not in (401, 403), reference.text
            assert reference.status_code < 500, reference.text
            if "{app_name}" in operation.path:
                assert f"app {real.app} not found" not in reference.text
            for kind in TOKEN_KINDS:
                cells += 1
                want = expected(operation.scope, kind, operation.names_org)
                response = send(kind, operation.request(real))
                assert not leaks_a_secret(response.text), f"a token leaked in {operation.path}"
                if want == ALLOW:
                    if response.status_code != reference.status_code:
                        wrong.append(
                            Cell(
                                operation,
                                kind,
                                reference.status_code,
                                response.status_code,
                                response.text[:120],
                            )
                        )
                    continue
                if response.status_code != want:
                    wrong.append(
                        Cell(operation, kind, want, response.status_code, response.text[:120])
                    )
                    continue
                assert_fly_error(response, int(want))
                if want == 404:
                    nowhere = send(kind, operation.request(ghost))
                    if unmask(nowhere, ghost) != response.text:
                        wrong.append(
                            Cell(
                                operation,
                                kind,
                                "same as absent",
                                404,
                                f"{response.text} vs {nowhere.text}",
                            )
                        )
            if operation.on_machine:
                # Org B names its own app but org A's machine: as if the machine did not exist.
                cells += 1
                deputy = Names(org=b.org, app=b.app, machine=a.machine_id)
                nowhere_in_b = Names(org=b.org, app=b.app, machine=GHOST_MACHINE)
                response = send("foreign_org", operation.request(deputy))
                nowhere = send("foreign_org", operation.request(nowhere_in_b))
                if nowhere.text.replace(GHOST_MACHINE, a.machine_id) != response.text:
                    wrong.append(
                        Cell(
                            operation,
                            "foreign_org via own app",
                            "same as absent",
                            response.status_code,
                            response.text[:120],
                        )
                    )
    finally:
        for client in clients.values():
            client.close()
    assert not wrong, f"{len(wrong)} of {cells} cells wrong:\n" + "\n".join(map(str, wrong))
    assert cells >= len(operations(openapi)) * len(TOKEN_KINDS)
