"""schemathesis against the running server's OpenAPI document: a real ``hangar server`` on
loopback with its own SQLite, every operation fuzzed with valid and invalid input, bounded by
``--fuzz-examples`` (per operation and pass) and ``--fuzz-seconds``. No answer may be a 5xx,
and every error body must be Fly-shaped: exactly ``{"error": str, "status": str}``.

Four passes: the operator with random names (orgs, tokens, and 404s everywhere else) and an
org token with the names of a real app and machine (so that bodies reach the services);
each with schema-valid and schema-invalid data. The org has machine and volume quotas, so the
fuzzer cannot fill the host; its machines' image is a layout that does not exist, so nothing boots;
and a leased machine keeps its app from being deleted halfway.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from hangar.server_process import ServerProcess
from tests.conftest import kill_vmms_under

pytestmark = pytest.mark.slow

FUZZ_ORG = "fuzz"
FUZZ_APP = "fuzz-app"
MACHINE_QUOTA = 4
VOLUME_QUOTA = {"volumes": 4, "volume_gb": 16}
# Real-names passes only: a follow would stream until the machine stops, a wait would wait.
REAL_NAMES_QUERY = {
    "GET /v1/apps/{app_name}/machines/{machine_id}/logs": {"follow": False},
    "GET /v1/apps/{app_name}/machines/{machine_id}/wait": {"timeout": 1, "state": "failed"},
}


@dataclass
class FuzzTarget:
    server: ServerProcess
    org_token: str
    names: dict[str, str]


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    home = tmp_path_factory.mktemp("fuzz-home")
    server = ServerProcess(home)
    server.start()
    try:
        with server.client() as api:
            assert api.post("/v1/orgs", json={"slug": FUZZ_ORG}).status_code == 201
            quotas = {"machines": MACHINE_QUOTA, **VOLUME_QUOTA}
            assert api.put(f"/v1/orgs/{FUZZ_ORG}/quotas", json=quotas).status_code == 200
            created = api.post("/v1/apps", json={"app_name": FUZZ_APP, "org_slug": FUZZ_ORG})
            assert created.status_code == 201, created.text
            nowhere = f"oci:{home / 'no-such-layout'}:latest"
            machine = api.post(
                f"/v1/apps/{FUZZ_APP}/machines",
                json={"config": {"image": nowhere}, "skip_launch": True},
            )
            assert machine.status_code == 200, machine.text
            # A leased machine the fuzzer cannot name: the app cannot be deleted under it.
            anchor = api.post(
                f"/v1/apps/{FUZZ_APP}/machines",
                json={"config": {"image": nowhere}, "skip_launch": True, "lease_ttl": 3600},
            )
            assert anchor.status_code == 200, anchor.text
            token = api.post("/v1/tokens", json={"org_slug": FUZZ_ORG}).json()["token"]
        names = {"app_name": FUZZ_APP, "machine_id": machine.json()["id"], "org_slug": FUZZ_ORG}
        yield FuzzTarget(server, token, names)
    finally:
        server.stop()
        kill_vmms_under(home)
        server.remove_network()


@dataclass
class Findings:
    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def note(self, label: str, case: Any, response: requests.Response) -> None:
        self.requests += 1
        self.by_status[response.status_code] = self.by_status.get(response.status_code, 0) + 1
        problem = fly_shape_problem(response)
        if problem:
            self.failures.append(f"{label}: {problem}\n    {case.as_curl_command()}")


def fly_shape_problem(response: requests.Response) -> str:
    if response.status_code >= 500:
        return f"server error {response.status_code}: {response.text[:300]}"
    if response.status_code < 400:
        return ""
    try:
        body = response.json()
    except json.JSONDecodeError:
        return f"{response.status_code} body is not JSON: {response.text[:200]}"
    if not (
        isinstance(body, dict)
        and set(body) == {"error", "status"}
        and isinstance(body["error"], str)
        and isinstance(body["status"], str)
        and body["status"]
    ):
        return f"{response.status_code} body is not Fly-shaped: {response.text[:200]}"
    return ""


def fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    base_url: str,
    token: str,
    fixed: dict[str, str] | None,
    findings: Findings,
) -> None:
    label = f"{operation.label} [{mode.value}{', real names' if fixed else ''}]"
    path_names = {name for name in fixed or {} if "{" + name + "}" in operation.path}
    strategy = operation.as_strategy(
        generation_mode=mode,
        path_parameters={name: (fixed or {})[name] for name in path_names} or None,
        query=REAL_NAMES_QUERY.get(operation.label) if fixed else None,
    )
    headers = {"Authorization": f"Bearer {token}"}
    session = requests.Session()

    @given(case=strategy)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def send(case: Any) -> None:
        case.headers = {**(case.headers or {}), **headers}
        response = case.call(base_url=base_url, session=session, timeout=30)
        findings.note(label, case, response)

    try:
        send()
    finally:
        session.close()


def test_no_5xx_and_fly_shaped_errors(
    fuzz_target: FuzzTarget, request: pytest.FixtureRequest
) -> None:
    examples = int(request.config.getoption("--fuzz-examples"))
    budget_s = float(request.config.getoption("--fuzz-seconds"))
    server = fuzz_target.server
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    passes = [
        (server.operator_token, None, GenerationMode.POSITIVE),
        (server.operator_token, None, GenerationMode.NEGATIVE),
        (fuzz_target.org_token, fuzz_target.names, GenerationMode.POSITIVE),
        (fuzz_target.org_token, fuzz_target.names, GenerationMode.NEGATIVE),
    ]
    findings = Findings()
    deadline = time.monotonic() + budget_s
    started = time.monotonic()
    for token, names, mode in passes:
        for operation in operations:
            if time.monotonic() > deadline:
                findings.skipped.append(f"{operation.label} [{mode.value}]")
                continue
            fuzz_operation(operation, mode, examples, server.url, token, names, findings)
    report = (
        f"{findings.requests} requests over {len(operations)} operations in "
        f"{time.monotonic() - started:.0f}s; statuses {dict(sorted(findings.by_status.items()))}"
    )
    print(report)
    if findings.skipped:
        # The budget only guards against a runaway; running out of it is reported, not failed.
        warnings.warn(f"fuzz budget spent before: {findings.skipped}", stacklevel=1)
    assert not findings.failures, f"{len(findings.failures)} bad answers ({report}):\n" + (
        "\n".join(findings.failures[:30])
    )
    assert findings.requests >= len(operations) * len(passes), report
    assert server.process is not None and server.process.poll() is None, server.log_tail()
