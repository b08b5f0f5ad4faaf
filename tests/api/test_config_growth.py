"""A machine's configs cannot grow the host's database without bound: a config has a size
limit, and only the newest versions (and finished runs) are kept."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from tests.api.helpers import assert_fly_error, unique, wait_runs_finished
from tests.fixtures.inprocess import InProcessServer

MIB = 1024 * 1024
UPDATES = 12


def database_bytes(home: Path) -> int:
    return sum(path.stat().st_size for path in home.glob("hangar.db*"))


def config_with_file(image: str, size: int, tag: str) -> dict[str, object]:
    payload = base64.b64encode(os.urandom(size)).decode()
    return {
        "image": image,
        "metadata": {"tag": tag},
        "files": [{"guest_path": "/etc/blob", "raw_value": payload}],
    }


def test_config_versions_and_runs_are_pruned_and_configs_capped(
    tmp_path: Path, test_image: str
) -> None:
    with InProcessServer(tmp_path, config_versions_kept=2) as server, server.client() as api:
        app = unique("growth")
        assert api.post("/v1/apps", json={"app_name": app}).status_code == 201
        too_big = {
            "image": test_image,
            "files": [
                {
                    "guest_path": f"/etc/{n}",
                    "raw_value": base64.b64encode(os.urandom(900_000)).decode(),
                }
                for n in range(2)
            ],
        }
        refused = api.post(
            f"/v1/apps/{app}/machines", json={"config": too_big, "skip_launch": True}
        )
        assert_fly_error(refused, 422, "config")
        created = api.post(
            f"/v1/apps/{app}/machines",
            json={"config": config_with_file(test_image, MIB, "v1"), "skip_launch": True},
        )
        assert created.status_code == 200, created.text
        machine_id = created.json()["id"]
        wait_runs_finished(api, app, machine_id)
        before = database_bytes(server.home)
        for n in range(UPDATES):
            update = {"config": config_with_file(test_image, MIB, f"v{n + 2}"), "skip_launch": True}
            response = api.post(f"/v1/apps/{app}/machines/{machine_id}", json=update)
            assert response.status_code == 200, response.text
            wait_runs_finished(api, app, machine_id)
        grown = database_bytes(server.home) - before
        # Each config is about 1.4 MB of JSON; kept: 2 versions, 2 runs and the machine's own.
        assert grown < 16 * MIB, f"the database grew by {grown / MIB:.1f} MiB"
        runs = api.get(f"/v1/apps/{app}/machines/{machine_id}/runs").json()
        assert len(runs) <= 2, [run["operation"] for run in runs if "operation" in run]
        machine = api.get(f"/v1/apps/{app}/machines/{machine_id}").json()
        assert machine["config"]["metadata"]["tag"] == f"v{UPDATES + 1}"
