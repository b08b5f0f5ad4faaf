"""``hangar secrets`` and ``hangar machine exec|ps|suspend|start|cordon|uncordon`` against the
shared server, on a real guest."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from typer.testing import CliRunner

from hangar.cli.main import app
from hangar.server_process import ServerProcess
from tests.agent.helpers import wait_state
from tests.api.helpers import unique

pytestmark = pytest.mark.slow

LOOP = ["sh", "-c", "while :; do sleep 1; done"]


def test_secrets_exec_ps_suspend_and_start_from_the_command_line(
    shared_server: ServerProcess, api: httpx.Client, test_image: str
) -> None:
    hangar = CliRunner(
        env={
            "HANGAR_API_URL": shared_server.url,
            "HANGAR_API_TOKEN": shared_server.operator_token,
            "COLUMNS": "200",
        }
    )
    name = unique("cli-exec")
    assert hangar.invoke(app, ["apps", "create", name]).exit_code == 0
    set_ = hangar.invoke(app, ["secrets", "set", "--app", name, "GREET=hi-there", "GONE=x"])
    assert set_.exit_code == 0, set_.output
    assert "secrets version 1" in set_.stdout
    unset = hangar.invoke(app, ["secrets", "unset", "--app", name, "GONE"])
    assert unset.exit_code == 0 and "secrets version 2" in unset.stdout
    listed = hangar.invoke(app, ["secrets", "list", "--app", name])
    assert listed.exit_code == 0, listed.output
    assert "GREET" in listed.stdout and "hi-there" not in listed.stdout
    assert "GONE" not in listed.stdout
    as_json = hangar.invoke(app, ["secrets", "list", "--app", name, "--json"])
    assert json.loads(as_json.stdout) == api.get(f"/v1/apps/{name}/secrets").json()
    [greet] = json.loads(as_json.stdout)["secrets"]
    assert greet["name"] == "GREET" and "hi-there" not in json.dumps(greet)
    # A keyed digest: not a prefix of the value's bare hash.
    assert not hashlib.sha256(b"hi-there").hexdigest().startswith(greet["digest"])

    run = hangar.invoke(app, ["machine", "run", test_image, "--app", name, "--detach", "--", *LOOP])
    assert run.exit_code == 0, run.output
    machine_id = run.stdout.strip().splitlines()[-1]
    wait_state(api, name, machine_id, "started")

    ran = hangar.invoke(
        app, ["machine", "exec", machine_id, "--app", name, "--", "sh", "-c", "echo $GREET; exit 4"]
    )
    assert ran.exit_code == 4, ran.output
    assert ran.stdout == "hi-there\n"
    piped = hangar.invoke(
        app,
        ["machine", "exec", machine_id, "--app", name, "--stdin", "-", "--", "tr", "a-z", "A-Z"],
        input="from stdin\n",
    )
    assert piped.exit_code == 0 and piped.stdout == "FROM STDIN\n", piped.output
    missing = hangar.invoke(app, ["machine", "exec", machine_id, "--app", name])
    assert missing.exit_code == 2 and "give the command after --" in missing.output

    ps = hangar.invoke(app, ["machine", "ps", machine_id, "--app", name])
    assert ps.exit_code == 0 and "while :; do sleep 1; done" in ps.stdout
    ps_json = json.loads(
        hangar.invoke(app, ["machine", "ps", machine_id, "--app", name, "--json"]).stdout
    )
    assert any("while :; do sleep 1; done" in p["command"] for p in ps_json)
    assert all(isinstance(p["pid"], int) and p["pid"] > 0 for p in ps_json)

    assert hangar.invoke(app, ["machine", "cordon", machine_id, "--app", name]).exit_code == 0
    assert api.get(f"/v1/apps/{name}/machines/{machine_id}").json()["cordoned"] is True
    assert hangar.invoke(app, ["machine", "uncordon", machine_id, "--app", name]).exit_code == 0
    assert api.get(f"/v1/apps/{name}/machines/{machine_id}").json()["cordoned"] is False

    # The guest's own marker survives the suspend: resumed, not booted afresh.
    marked = hangar.invoke(
        app, ["machine", "exec", machine_id, "--app", name, "--", "sh", "-c", "echo kept > /tmp/m"]
    )
    assert marked.exit_code == 0, marked.output
    assert hangar.invoke(app, ["machine", "suspend", machine_id, "--app", name]).exit_code == 0
    wait_state(api, name, machine_id, "suspended")
    assert hangar.invoke(app, ["machine", "start", machine_id, "--app", name]).exit_code == 0
    wait_state(api, name, machine_id, "started")
    again = hangar.invoke(
        app, ["machine", "exec", machine_id, "--app", name, "--", "cat", "/tmp/m"]
    )
    assert again.exit_code == 0 and again.stdout == "kept\n", again.output
    destroy = hangar.invoke(app, ["machine", "destroy", machine_id, "--app", name, "--force"])
    assert destroy.exit_code == 0, destroy.output
