"""Conformance to **Fly's** description of the Machines API (not hangar's own): schemathesis
reads ../shared/fly/machines-openapi-2024-01.yaml with the documented patch of
tests/api/fly_schema.py applied, and every response hangar sends for an operation it
implements must conform to Fly's schema for its status (answers Fly does not describe, such
as 404 or 422, must be Fly-shaped errors). hangar's own OpenAPI fuzzing is test_fuzz.py.

Against a live ``hangar server`` (a subprocess) over HTTP:

1. the requests Fly's Go client sends, along a machine's life: create (with a lease), update,
   wait, exec and ps in a running guest, cordon, metadata, events and versions, start and
   stop, and a machine that exited (its exit event typed as fly-go decodes it);
2. then schemathesis' own examples of every operation, with the real app and a machine that
   never boots (so nothing generated runs in a guest), the destructive ones last.

An operation of the description joins as soon as hangar serves its path and method (the
volumes routes will, once they exist); those it does not serve are listed in the output.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from hangar.server_process import ServerProcess
from tests.api.fly_schema import BASE_PATH, apply_patch, load_description
from tests.api.test_fuzz import fly_shape_problem
from tests.conftest import kill_vmms_under

pytestmark = pytest.mark.slow

APP = "conform"
EXAMPLES = 6
TICKER = ["sh", "-c", "while :; do echo tick; sleep 1; done"]
DESTRUCTIVE_LAST = ("DELETE",)
# Generated requests that would wait or stream: bounded.
QUERY = {
    "GET /apps/{app_name}/machines/{machine_id}/wait": {"timeout": 1},
}


@dataclass
class Target:
    server: ServerProcess
    base_url: str
    schema: Any
    operations: list[Any]
    """The description's operations hangar serves (its path under /v1, its method)."""
    running: str
    exited: str
    fuzzed: str
    checked: dict[str, int] = field(default_factory=dict)
    """Operation label -> responses validated against Fly's schema for their status."""

    def operation(self, label: str) -> Any:
        return next(op for op in self.operations if op.label == label)


@pytest.fixture(scope="module")
def fly_description(request: pytest.FixtureRequest) -> dict[str, Any]:
    path = Path(request.config.getoption("--fly-openapi"))
    if not path.exists():
        pytest.fail(f"Fly's description is not at {path}: pass --fly-openapi PATH")
    return apply_patch(load_description(path))


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory, test_image: str, fly_description: dict[str, Any]
) -> Iterator[Target]:
    home = tmp_path_factory.mktemp("conform-home")
    server = ServerProcess(home)
    server.start()
    try:
        with server.client() as api:
            assert api.post("/v1/apps", json={"name": APP, "network": ""}).status_code == 201
            machines = f"/v1/apps/{APP}/machines"
            config = {"image": test_image, "restart": {"policy": "no"}, "init": {}}
            running = api.post(machines, json={"config": {**config, "init": {"cmd": TICKER}}})
            exited = api.post(
                machines, json={"config": {**config, "init": {"cmd": ["sh", "-c", "exit 3"]}}}
            )
            fuzzed = api.post(machines, json={"config": config, "skip_launch": True})
            for response in (running, exited, fuzzed):
                assert response.status_code == 200, response.text
            ids = [r.json()["id"] for r in (running, exited, fuzzed)]
            for machine_id, state in ((ids[0], "started"), (ids[1], "stopped")):
                waited = api.get(
                    f"{machines}/{machine_id}/wait", params={"state": state, "timeout": 60}
                )
                assert waited.status_code == 200, waited.text
            ours = api.get("/openapi.json").json()["paths"]
        schema = schemathesis.openapi.from_dict(fly_description)
        every = [result.ok() for result in schema.get_all_operations()]
        served = [op for op in every if op.method.lower() in ours.get(BASE_PATH + op.path, {})]
        missing = sorted({op.label for op in every} - {op.label for op in served})
        print(f"hangar serves {len(served)} of {len(every)} operations; not yet: {missing}")
        yield Target(server, server.url + BASE_PATH, schema, served, *ids)
    finally:
        server.stop()
        kill_vmms_under(home)
        server.remove_network()


def validate(target: Target, operation: Any, response: Any) -> None:
    """Fly's schema for a status it documents; a Fly-shaped error for any other answer."""
    assert response.status_code < 500, f"{operation.label}: {response.text[:300]}"
    problem = fly_shape_problem(response)
    assert not problem, f"{operation.label}: {problem}"
    operation.validate_response(response)
    if operation.responses.find_by_status_code(response.status_code) is not None:
        target.checked[operation.label] = target.checked.get(operation.label, 0) + 1


class FlyClient:
    """Requests as a Fly client sends them, each checked against its operation in Fly's
    description (``label``: ``METHOD /path/{template}``)."""

    def __init__(self, target: Target, api: httpx.Client) -> None:
        self._target = target
        self._api = api

    def __call__(self, label: str, path: str, expect: int = 200, **kwargs: Any) -> httpx.Response:
        method = label.split(" ", 1)[0]
        response = self._api.request(method, BASE_PATH + path, **kwargs)
        assert response.status_code == expect, f"{label} {path}: {response.text[:300]}"
        validate(self._target, self._target.operation(label), response)
        return response


M = "/apps/{app_name}/machines"
ONE = M + "/{machine_id}"


def test_fly_clients_requests_get_fly_shaped_answers(target: Target) -> None:
    machines = f"/apps/{APP}/machines"
    with target.server.client() as api:
        fly = FlyClient(target, api)
        fly("GET /apps", "/apps?org_slug=personal")
        fly("GET /apps/{app_name}", f"/apps/{APP}")
        fly(f"GET {M}", machines)
        exited = fly(f"GET {ONE}", f"{machines}/{target.exited}").json()
        exits = [e for e in exited["events"] if e["type"] == "exit"]
        assert exits and exits[0]["request"]["exit_event"]["exit_code"] == 3
        fly(f"GET {ONE}/events", f"{machines}/{target.exited}/events")

        launch = {
            "config": {"init": {}, "image": exited["config"]["image"], "guest": {"cpus": 1}},
            "skip_launch": True,
            "skip_secrets": False,
            "lease_ttl": 30,
        }
        created = fly(f"POST {M}", machines, json=launch).json()
        mine = f"{machines}/{created['id']}"
        lease = {"fly-machine-lease-nonce": created["nonce"]}
        fly(f"GET {ONE}/lease", f"{mine}/lease")
        fly(f"DELETE {ONE}/lease", f"{mine}/lease", headers=lease)
        nonce = fly(f"POST {ONE}/lease", f"{mine}/lease?ttl=120").json()["data"]["nonce"]
        lease = {"fly-machine-lease-nonce": nonce}
        update = {**launch, "current_version": created["version"]}
        fly(f"POST {ONE}", mine, json=update, headers=lease)
        fly(f"GET {ONE}/versions", f"{mine}/versions")
        metadata = f"{mine}/metadata/role"
        fly(f"POST {ONE}/metadata/{{key}}", metadata, 204, json={"value": "w"}, headers=lease)
        fly(f"GET {ONE}/metadata", f"{mine}/metadata")
        fly(f"DELETE {ONE}/metadata/{{key}}", metadata, 204, headers=lease)
        fly(f"POST {ONE}/cordon", f"{mine}/cordon", headers=lease)
        fly(f"POST {ONE}/uncordon", f"{mine}/uncordon", headers=lease)
        fly(f"DELETE {ONE}", f"{mine}?kill=true", headers=lease)
        fly(f"GET {ONE}/wait", f"{mine}/wait?state=destroyed&timeout=30")

        running = f"{machines}/{target.running}"
        answer = fly(f"POST {ONE}/exec", f"{running}/exec", json={"cmd": "hostname"})
        assert answer.json()["stdout"].strip() == target.running
        fly(f"GET {ONE}/ps", f"{running}/ps")
        fly(f"POST {ONE}/stop", f"{running}/stop", json={"timeout": "1m0s"})
        fly(f"GET {ONE}/wait", f"{running}/wait?state=stopped&timeout=60")
        fly(f"POST {ONE}/start", f"{running}/start")
        fly(f"GET {ONE}/wait", f"{running}/wait?state=started&timeout=60")
        fly(f"POST {ONE}/restart", f"{running}/restart?timeout=2s&force_stop=false")
        fly(f"GET {ONE}/wait", f"{running}/wait?state=started&timeout=60")
        # Once its init answers (exec), the guest takes signals.
        fly(f"POST {ONE}/exec", f"{running}/exec", json={"command": ["true"]})
        fly(f"POST {ONE}/signal", f"{running}/signal", json={"signal": "SIGTERM"})
        fly(f"GET {ONE}/wait", f"{running}/wait?state=stopped&timeout=60")
        name = f"conform-{int(time.time())}"
        body = {"name": name, "org_slug": "personal", "network": "", "app_role_id": ""}
        fly("POST /apps", "/apps", 201, json=body)
        fly("DELETE /apps/{app_name}", f"/apps/{name}", 202)

    unchecked = {op.label for op in target.operations if "/volumes" not in op.path} - set(
        target.checked
    )
    assert not unchecked, f"served but never checked against Fly's schema: {sorted(unchecked)}"


def fuzz_operation(
    target: Target,
    operation: Any,
    names: dict[str, str],
    session: requests.Session,
    failures: list[str],
) -> None:
    headers = {"Authorization": f"Bearer {target.server.operator_token}"}
    path_names = {name for name in names if "{" + name + "}" in operation.path}
    strategy = operation.as_strategy(
        generation_mode=GenerationMode.POSITIVE,
        path_parameters={name: names[name] for name in path_names} or None,
        query=QUERY.get(operation.label),
    )

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def send(case: Any) -> None:
        case.headers = {**(case.headers or {}), **headers}
        response = case.call(base_url=target.base_url, session=session, timeout=30)
        try:
            validate(target, operation, response)
        except Exception as error:
            failures.append(f"{operation.label}: {error}\n    {case.as_curl_command()}")

    send()


def test_schemathesis_examples_conform_to_flys_schema(target: Target) -> None:
    """schemathesis' examples of every served operation: real names, positive data, the
    machine one that never boots, the deletes last."""
    operations = sorted(target.operations, key=lambda op: op.method.upper() in DESTRUCTIVE_LAST)
    names = {"app_name": APP, "machine_id": target.fuzzed}
    failures: list[str] = []
    with requests.Session() as session:
        for operation in operations:
            fuzz_operation(target, operation, names, session, failures)
    print(f"validated against Fly's schema: {dict(sorted(target.checked.items()))}")
    assert not failures, f"{len(failures)} answers off Fly's schema:\n" + "\n".join(failures[:20])
