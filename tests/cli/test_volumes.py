"""``hangar volumes ...`` and ``hangar machine run -v NAME:/path`` against the shared server:
a volume made, listed, shown, extended and snapshotted from the CLI, mounted by name in a
real guest that writes and reads it, and destroyed."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from hangar.cli.main import app
from hangar.server_process import ServerProcess
from tests.api.helpers import unique

pytestmark = pytest.mark.slow


@pytest.fixture
def hangar(shared_server: ServerProcess) -> CliRunner:
    return CliRunner(
        env={
            "HANGAR_API_URL": shared_server.url,
            "HANGAR_API_TOKEN": shared_server.operator_token,
            "COLUMNS": "250",
        }
    )


def test_volumes_from_the_cli_and_a_machine_that_mounts_one_by_name(
    hangar: CliRunner, test_image: str
) -> None:
    app_name = unique("cli-vols")
    assert hangar.invoke(app, ["apps", "create", app_name]).exit_code == 0
    created = hangar.invoke(
        app, ["volumes", "create", "data", "--app", app_name, "--no-encryption", "--size", "1"]
    )
    assert created.exit_code == 0, created.output
    [volume_id] = re.findall(r"vol_[0-9a-z]{16}", created.stdout)
    listed = hangar.invoke(app, ["volumes", "list", "--app", app_name])
    assert volume_id in listed.stdout and "created" in listed.stdout
    shown = json.loads(hangar.invoke(app, ["volumes", "show", volume_id, "-a", app_name]).stdout)
    assert (shown["name"], shown["encrypted"], shown["size_gb"]) == ("data", False, 1)
    extended = hangar.invoke(app, ["volumes", "extend", volume_id, "-a", app_name, "-s", "2"])
    assert extended.exit_code == 0 and "2GB" in extended.stdout, extended.output
    snapshot = hangar.invoke(app, ["volumes", "snapshots", "create", volume_id, "-a", app_name])
    assert snapshot.exit_code == 0, snapshot.output
    snapshots = hangar.invoke(app, ["volumes", "snapshots", "list", volume_id, "-a", app_name])
    assert snapshot.stdout.strip() in snapshots.stdout and "on request" in snapshots.stdout

    missing = hangar.invoke(
        app, ["machine", "run", test_image, "--app", app_name, "-v", "nothing:/data"]
    )
    assert missing.exit_code == 1 and "no unattached volume named nothing" in missing.stderr
    run = hangar.invoke(
        app,
        [
            "machine",
            "run",
            test_image,
            "--app",
            app_name,
            "--rm",
            "-v",
            "data:/data",
            "--",
            "sh",
            "-c",
            "echo kept-on-the-volume > /data/note; cat /data/note; df -k /data",
        ],
    )
    assert run.exit_code == 0, run.output
    assert "kept-on-the-volume" in run.stdout
    sizes = [int(line.split()[1]) for line in run.stdout.splitlines() if line.endswith(" /data")]
    assert sizes and sizes[0] > 1_900_000, "mounted at its extended size"

    destroyed = hangar.invoke(app, ["volumes", "destroy", volume_id, "-a", app_name])
    assert destroyed.exit_code == 0 and "destroyed" in destroyed.stdout, destroyed.output
    assert volume_id not in hangar.invoke(app, ["volumes", "list", "-a", app_name]).stdout
