"""``--json`` prints the API's JSON as it is, on every command that prints a thing or a list;
``hangar usage`` prints an org's metered time and cost."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from hangar.cli.main import app
from hangar.server_process import ServerProcess


@pytest.fixture
def hangar(shared_server: ServerProcess) -> CliRunner:
    return CliRunner(
        env={
            "HANGAR_API_URL": shared_server.url,
            "HANGAR_API_TOKEN": shared_server.operator_token,
            "COLUMNS": "80",
        }
    )


@pytest.mark.parametrize(
    ("command", "path"),
    [
        (["apps", "list"], "/v1/apps"),
        (["orgs", "list"], "/v1/orgs"),
        (["tokens", "list"], "/v1/tokens"),
        (["usage", "--org", "personal", "--from", "0", "--to", "1"], "/v1/orgs/personal/usage"),
    ],
)
def test_json_is_the_apis_answer(
    hangar: CliRunner, api: httpx.Client, command: list[str], path: str
) -> None:
    result = hangar.invoke(app, [*command, "--json"])
    assert result.exit_code == 0, result.output
    params = {"from": "0", "to": "1"} if command[0] == "usage" else {}
    assert json.loads(result.stdout) == api.get(path, params=params).json()


def test_json_of_a_machine_list_and_an_app(hangar: CliRunner, app_name: str) -> None:
    listed = hangar.invoke(app, ["machine", "list", "--app", app_name, "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []
    created = hangar.invoke(app, ["apps", "create", f"{app_name}-2", "--json"])
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout)["name"] == f"{app_name}-2"


def test_usage_prints_groups_and_a_total(hangar: CliRunner) -> None:
    result = hangar.invoke(app, ["usage", "--org", "personal", "--by", "gpu_kind"])
    assert result.exit_code == 0, result.output
    assert "usage of personal from" in result.stdout
    header, *rows = [line for line in result.stdout.splitlines()[1:] if line.strip()]
    assert header.split()[0] == "GPU_KIND" and "USD" in header
    assert rows[-1].split()[0] == "total"
    refused = hangar.invoke(app, ["usage", "--org", "personal", "--by", "region"])
    assert refused.exit_code == 1 and "(HTTP 400" in refused.stderr
