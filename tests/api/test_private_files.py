"""Everything under ``$HANGAR_HOME`` is the server user's alone: a local user must not read a
tenant's env from the database, a machine's initrd or its root disk."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx

from hangar.model.guest_contract import RunDir
from tests.agent.helpers import machine_path, run_machine, wait_state
from tests.fixtures.inprocess import InProcessServer


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_home_and_its_database_are_private(tmp_path: Path) -> None:
    home = tmp_path / "custom" / "home"
    with InProcessServer(home):
        assert mode(home) == 0o700
        for path in [home / "machines", *home.glob("hangar.db*")]:
            assert mode(path) & 0o077 == 0, (path, oct(mode(path)))


def test_an_existing_readable_home_and_database_are_made_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    database = home / "hangar.db"
    database.touch()
    database.chmod(0o644)
    with InProcessServer(home):
        assert mode(home) == 0o700
        assert mode(database) == 0o600


def test_a_machines_initrd_and_root_disk_are_private(
    api_server: InProcessServer, api: httpx.Client, app_name: str, test_image: str
) -> None:
    machine_id = run_machine(
        api, app_name, test_image, ["sh", "-c", "sleep 600"], env={"SECRET": "hunter2"}
    )
    try:
        wait_state(api, app_name, machine_id, "started")
        run_dir = api_server.home / "machines" / machine_id
        assert mode(run_dir) == 0o700
        for name in RunDir.BOOT_FILES:
            assert mode(run_dir / name) == 0o600, name
    finally:
        api.delete(machine_path(app_name, machine_id), params={"force": "true"})
