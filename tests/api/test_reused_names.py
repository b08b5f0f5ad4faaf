"""An app name that outlives its owner: records belong to the app instance, deleting an app
deletes everything under it, and the name stays with its org for a while."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import create_token
from tests.api.helpers import assert_fly_error, unique, wait_runs_finished
from tests.fixtures.inprocess import InProcessServer

SECRET = "s3cr3t-of-org-a"


@pytest.fixture(scope="module")
def no_hold_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """A server that lets another org take a deleted name at once (no hold)."""
    with InProcessServer(tmp_path_factory.mktemp("no-hold"), app_name_hold_s=0) as server:
        yield server


def leave_a_destroyed_machine(api: httpx.Client, app: str, image: str) -> str:
    """Org A's machine with secrets in env, files and metadata, destroyed."""
    config = {
        "image": image,
        "env": {"DB_PASSWORD": SECRET},
        "metadata": {"owner": SECRET},
        "files": [
            {"guest_path": "/etc/secret", "raw_value": base64.b64encode(SECRET.encode()).decode()}
        ],
    }
    created = api.post(f"/v1/apps/{app}/machines", json={"config": config, "skip_launch": True})
    assert created.status_code == 200, created.text
    machine_id: str = created.json()["id"]
    wait_runs_finished(api, app, machine_id)
    assert api.delete(f"/v1/apps/{app}/machines/{machine_id}").status_code == 200
    waited = api.get(
        f"/v1/apps/{app}/machines/{machine_id}/wait", params={"state": "destroyed", "timeout": 30}
    )
    assert waited.status_code == 200, waited.text
    wait_runs_finished(api, app, machine_id)
    return machine_id


def test_a_reused_name_shows_nothing_of_the_previous_owner(
    no_hold_server: InProcessServer, test_image: str
) -> None:
    name, org_a, org_b = unique("reused"), unique("org-a"), unique("org-b")
    with no_hold_server.client() as operator:
        for org in (org_a, org_b):
            assert operator.post("/v1/orgs", json={"slug": org}).status_code == 201
        token_a = create_token(operator, org_slug=org_a)
        token_b = create_token(operator, org_slug=org_b)
    with no_hold_server.client(token_a) as a, no_hold_server.client(token_b) as b:
        assert a.post("/v1/apps", json={"app_name": name}).status_code == 201
        old_id = leave_a_destroyed_machine(a, name, test_image)
        sealed = a.post(f"/v1/apps/{name}/secrets/DB_PASSWORD", json={"value": SECRET})
        assert sealed.status_code == 200, sealed.text
        assert a.delete(f"/v1/apps/{name}").status_code == 202

        assert b.post("/v1/apps", json={"app_name": name}).status_code == 201
        # The app's secrets went with it: the new owner starts from none, at version 0.
        secrets = b.get(f"/v1/apps/{name}/secrets")
        assert secrets.status_code == 200 and secrets.json() == {"secrets": []}, secrets.text
        ahead = {"config": {"image": test_image}, "skip_launch": True, "min_secrets_version": 1}
        assert_fly_error(
            b.post(f"/v1/apps/{name}/machines", json=ahead), 412, "min_secrets_version"
        )
        listed = b.get(f"/v1/apps/{name}/machines", params={"include_deleted": "true"})
        assert listed.status_code == 200 and listed.json() == [], listed.text
        assert SECRET not in listed.text
        for tail in ("", "/events", "/runs", "/metadata", "/logs"):
            response = b.get(f"/v1/apps/{name}/machines/{old_id}{tail}")
            assert response.status_code == 404, (tail, response.text)
            assert SECRET not in response.text
    # Not hidden only: gone from the database and its write-ahead log.
    for path in Path(no_hold_server.home).glob("hangar.db*"):
        assert SECRET.encode() not in path.read_bytes(), path


def test_a_deleted_name_is_held_for_its_org(api: httpx.Client, test_image: str) -> None:
    name, org_a, org_b = unique("held"), unique("held-a"), unique("held-b")
    for org in (org_a, org_b):
        assert api.post("/v1/orgs", json={"slug": org}).status_code == 201
    assert api.post("/v1/apps", json={"app_name": name, "org_slug": org_a}).status_code == 201
    old_id = leave_a_destroyed_machine(api, name, test_image)
    assert api.delete(f"/v1/apps/{name}").status_code == 202
    taken = api.post("/v1/apps", json={"app_name": name, "org_slug": org_b})
    assert_fly_error(taken, 409, name)
    again = api.post("/v1/apps", json={"app_name": name, "org_slug": org_a})
    assert again.status_code == 201, again.text
    listed = api.get(f"/v1/apps/{name}/machines", params={"include_deleted": "true"}).json()
    assert listed == []
    assert api.get(f"/v1/apps/{name}/machines/{old_id}").status_code == 404
