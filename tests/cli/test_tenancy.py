"""``hangar orgs|tokens|audit|admin`` against the shared server, and how the CLI finds its
token: HANGAR_API_TOKEN, else the server's operator.token file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from hangar.api.services.tokens import TokenService
from hangar.cli.main import app
from hangar.clock import SystemClock
from hangar.errors import Unauthenticated
from hangar.server import bootstrap_operator_token
from hangar.server_process import ServerProcess, free_port
from hangar.settings import DATABASE, OPERATOR_TOKEN_FILE
from hangar.store.machines import SqliteMachineStore
from hangar.store.tenancy import SqliteTenancyStore
from tests.api.helpers import unique


@pytest.fixture
def hangar(shared_server: ServerProcess) -> CliRunner:
    return CliRunner(
        env={
            "HANGAR_API_URL": shared_server.url,
            "HANGAR_API_TOKEN": shared_server.operator_token,
            "COLUMNS": "200",
        }
    )


def test_orgs_tokens_and_audit_round_trip(hangar: CliRunner) -> None:
    org = unique("cli")
    assert hangar.invoke(app, ["orgs", "create", org]).exit_code == 0
    quota = hangar.invoke(app, ["orgs", "quota", org, "--machines", "2", "--gpu", "l40s=1"])
    assert quota.exit_code == 0, quota.output
    listed = hangar.invoke(app, ["orgs", "list"])
    assert org in listed.stdout and "machines=2" in listed.stdout

    created = hangar.invoke(
        app, ["tokens", "create", "--org", org, "--read-only", "--expires", "24h"]
    )
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    assert secret.startswith("hgr_") and "\n" not in secret
    tokens = hangar.invoke(app, ["tokens", "list", "--org", org])
    assert "read-only" in tokens.stdout and secret not in tokens.stdout
    token_id = tokens.stdout.split("tok_", 1)[1].split()[0]

    as_org = CliRunner(env={**hangar.env, "HANGAR_API_TOKEN": secret, "COLUMNS": "200"})
    assert as_org.invoke(app, ["apps", "list"]).exit_code == 0
    refused = as_org.invoke(app, ["apps", "create", unique("nope")])
    assert refused.exit_code == 1 and "read-only" in refused.stderr

    assert hangar.invoke(app, ["tokens", "revoke", f"tok_{token_id}"]).exit_code == 0
    revoked = as_org.invoke(app, ["apps", "list"])
    assert revoked.exit_code == 1 and "revoked" in revoked.stderr

    audit = hangar.invoke(app, ["audit", "--org", org])
    assert audit.exit_code == 0
    for action in ("create_org", "set_org_quotas", "create_token", "create_app", "revoke_token"):
        assert action in audit.stdout, audit.stdout


def test_the_operator_token_file_and_admin_token(
    shared_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from_file = CliRunner(
        env={
            "HANGAR_API_URL": shared_server.url,
            "HANGAR_API_TOKEN": None,
            "HANGAR_HOME": str(shared_server.home),
        }
    )
    assert from_file.invoke(app, ["orgs", "list"]).exit_code == 0
    minted = from_file.invoke(app, ["admin", "token", "--description", "cli test"])
    assert minted.exit_code == 0, minted.output
    as_admin = CliRunner(
        env={
            "HANGAR_API_URL": shared_server.url,
            "HANGAR_API_TOKEN": minted.stdout.strip(),
            "HANGAR_HOME": str(tmp_path_factory.mktemp("no-home")),
        }
    )
    assert as_admin.invoke(app, ["tokens", "list"]).exit_code == 0
    nowhere = CliRunner(env={"HANGAR_HOME": str(tmp_path_factory.mktemp("empty"))})
    missing = nowhere.invoke(app, ["admin", "token"])
    assert missing.exit_code == 2 and "no hangar database" in missing.stderr


def test_server_init_prints_a_new_operator_token_and_revokes_the_old_one(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = tmp_path_factory.mktemp("init-home")
    tokens = TokenService(
        SqliteTenancyStore(home / DATABASE), SqliteMachineStore(home / DATABASE), SystemClock()
    )
    old = bootstrap_operator_token(home / OPERATOR_TOKEN_FILE, tokens)
    assert old is not None
    server = subprocess.Popen(
        [sys.executable, "-m", "hangar.cli.main", "server", "--init", "--port", str(free_port())],
        env={**os.environ, "HANGAR_HOME": str(home), "HANGAR_NET": "0"},  # no bridge of its own
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        printed = [server.stdout.readline().strip() for _ in range(2)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "operator token" in printed[0]
    assert printed[1] == (home / OPERATOR_TOKEN_FILE).read_text().strip() != old
    assert tokens.authenticate(printed[1]).kind == "operator"
    with pytest.raises(Unauthenticated):
        tokens.authenticate(old)
