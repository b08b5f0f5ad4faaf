"""``hangar llm deploy|list|status|scale|key|destroy`` against the shared server, with an
image deployment (nothing boots until a request comes, and none comes here)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from hangar.cli.main import app
from hangar.server_process import ServerProcess
from tests.api.helpers import unique


def test_the_llm_commands(shared_server: ServerProcess, test_image: str) -> None:
    hangar = CliRunner(
        env={
            "HANGAR_API_URL": shared_server.url,
            "HANGAR_API_TOKEN": shared_server.operator_token,
            "COLUMNS": "250",
        }
    )
    org, name = unique("llmorg"), "echo"
    assert hangar.invoke(app, ["orgs", "create", org]).exit_code == 0
    deploy = [
        "llm", "deploy", name, "--org", org, "--model", "/models/m.gguf", "--image", test_image,
        "--max", "2", "--memory-mb", "256",
    ]  # fmt: skip
    deployed = hangar.invoke(app, deploy)
    assert deployed.exit_code == 0, deployed.output
    assert name in deployed.stdout and "image" in deployed.stdout
    again = hangar.invoke(app, deploy)
    assert again.exit_code == 1 and "already has a deployment named echo" in again.stderr

    listed = json.loads(hangar.invoke(app, ["llm", "list", "--org", org, "--json"]).stdout)
    assert [(d["name"], d["max_replicas"], d["replicas"]) for d in listed] == [(name, 2, [])]
    status = hangar.invoke(app, ["llm", "status", name, "--org", org])
    assert status.exit_code == 0 and "REPLICA" in status.stdout, status.output
    scaled = hangar.invoke(app, ["llm", "scale", name, "--org", org, "--max", "3", "--json"])
    assert json.loads(scaled.stdout)["max_replicas"] == 3, scaled.output
    bad = hangar.invoke(app, ["llm", "scale", name, "--org", org, "--min", "4"])
    assert bad.exit_code == 1 and "min_replicas is larger than max_replicas" in bad.stderr
    key = hangar.invoke(app, ["llm", "key", name, "--org", org])
    assert key.exit_code == 0 and key.stdout.startswith("hgl_"), key.output

    destroyed = hangar.invoke(app, ["llm", "destroy", name, "--org", org])
    assert destroyed.exit_code == 0, destroyed.output
    missing = hangar.invoke(app, ["llm", "status", name, "--org", org])
    assert missing.exit_code == 1 and "not found" in missing.stderr
