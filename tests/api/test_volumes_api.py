"""The volumes API without guests: Fly's shapes, and every bad input answered with a
Fly-shaped 4xx before anything is written (sizes, names, regions, snapshots, sources, a
machine's mounts of a volume that is missing, another app's, in another region, on another
host or attached elsewhere), org quotas on volumes, and apps that still have volumes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hangar.model.volume import Volume, VolumeState
from hangar.volumes.model import VOLUME_ID_PATTERN, new_volume_id
from tests.api.helpers import assert_fly_error, unique
from tests.fixtures.inprocess import InProcessServer

FLY_VOLUME_FIELDS = {
    "id",
    "name",
    "state",
    "size_gb",
    "region",
    "zone",
    "encrypted",
    "attached_machine_id",
    "attached_alloc_id",
    "created_at",
    "blocks",
    "block_size",
    "blocks_free",
    "blocks_avail",
    "fstype",
    "snapshot_retention",
    "auto_backup_enabled",
    "host_status",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    with InProcessServer(tmp_path_factory.mktemp("volumes-api"), net=False, proxy=False) as running:
        yield running


@pytest.fixture
def api(server: InProcessServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture
def app(api: httpx.Client) -> str:
    name = unique("vapi")
    assert api.post("/v1/apps", json={"app_name": name}).status_code == 201
    return name


def volumes_path(app: str, volume_id: str = "", verb: str = "") -> str:
    return (
        f"/v1/apps/{app}/volumes"
        + (f"/{volume_id}" if volume_id else "")
        + (f"/{verb}" if verb else "")
    )


def create(api: httpx.Client, app: str, **body: Any) -> dict[str, Any]:
    response = api.post(volumes_path(app), json={"name": "data", "encrypted": False, **body})
    assert response.status_code == 200, response.text
    volume: dict[str, Any] = response.json()
    return volume


def insert(server: InProcessServer, app: str, **fields: Any) -> Volume:
    """A record as another host of a fleet would have written it (no image here)."""
    now = 1_800_000_000.0
    volume = Volume.model_validate(
        {
            "id": new_volume_id(),
            "name": "far",
            "app": app,
            "region": server.embedded.host.region,
            "host_id": server.embedded.host.id,
            "size_gb": 1,
            "state": VolumeState.CREATED,
            "snapshot_retention": 5,
            "created_at": now,
            "updated_at": now,
            **fields,
        }
    )
    server.embedded.stores.volumes.insert_volume(volume)
    return volume


def images(server: InProcessServer) -> list[str]:
    folder = server.home / "volumes" / "images"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_volumes_are_flys_json(api: httpx.Client, app: str, test_image: str) -> None:
    volume = create(api, app, size_gb=2, snapshot_retention=7)
    assert set(volume) >= FLY_VOLUME_FIELDS
    assert VOLUME_ID_PATTERN.match(volume["id"])
    assert (volume["state"], volume["size_gb"], volume["snapshot_retention"]) == ("created", 2, 7)
    assert volume["attached_machine_id"] is None and volume["host_status"] == "ok"
    assert volume["blocks"] * volume["block_size"] == 2 << 30
    assert 0 < volume["blocks_free"] <= volume["blocks"]
    assert volume["created_at"].endswith("Z")
    assert [v["id"] for v in api.get(volumes_path(app)).json()] == [volume["id"]]
    assert api.get(volumes_path(app, volume["id"])).json()["id"] == volume["id"]
    assert api.get(f"/v1/apps/{app}").json()["volume_count"] == 1

    updated = api.post(
        volumes_path(app, volume["id"]),
        json={"snapshot_retention": 10, "auto_backup_enabled": False},
    )
    assert updated.status_code == 200, updated.text
    assert (updated.json()["snapshot_retention"], updated.json()["auto_backup_enabled"]) == (
        10,
        False,
    )
    taken = api.post(volumes_path(app, volume["id"], "snapshots"))
    assert taken.status_code == 200, taken.text
    [listed] = api.get(volumes_path(app, volume["id"], "snapshots")).json()
    assert listed["id"] == taken.json()["id"] and listed["size"] == 2 << 30
    assert (listed["status"], listed["retention_days"], listed["scheduled"]) == (
        "created",
        10,
        False,
    )

    gone = api.delete(volumes_path(app, volume["id"]))
    assert gone.status_code == 200 and gone.json()["state"] == "destroyed"
    assert api.get(volumes_path(app)).json() == []
    assert [
        v["state"] for v in api.get(volumes_path(app), params={"include_deleted": True}).json()
    ] == ["destroyed"]
    assert_fly_error(api.delete(volumes_path(app, volume["id"])), 404, "destroyed")


def test_bad_input_is_refused_before_anything_is_written(
    server: InProcessServer, api: httpx.Client, app: str
) -> None:
    before = images(server)
    other_app = unique("vapi-other")
    assert api.post("/v1/apps", json={"app_name": other_app}).status_code == 201
    theirs = create(api, other_app)
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"name": "data", "size_gb": 0}, 422, "size_gb"),
        ({"name": "data", "size_gb": 501}, 422, "size_gb"),
        ({"name": "Data"}, 422, "name"),
        ({"name": "x" * 31}, 422, "name"),
        ({"name": "data", "region": "far"}, 422, "region"),
        ({"name": "data", "fstype": "xfs"}, 422, "fstype"),
        ({"name": "data", "snapshot_retention": 0}, 422, "snapshot_retention"),
        ({"name": "data", "snapshot_retention": 61}, 422, "snapshot_retention"),
        ({"name": "data", "snapshot_id": "vs_0000000000000000"}, 404, "snapshot"),
        ({"name": "data", "source_volume_id": theirs["id"]}, 404, "not found"),
        ({"name": "data", "machines_only": False}, 422, "machines_only"),
        ({"name": "data", "compute": {"cpus": 64, "memory_mb": 1 << 20}}, 422, "compute"),
    ]
    for body, status, word in cases:
        assert_fly_error(api.post(volumes_path(app), json=body), status, word)
    assert api.get(volumes_path(app)).json() == []
    assert images(server) == sorted([*before, f"{theirs['id']}.qcow2"])

    mine = create(api, app)
    for body, status, word in [
        ({"size_gb": 1}, 422, "grow, never shrink"),
        ({"size_gb": 0}, 422, "size_gb"),
        ({}, 422, "size_gb"),
    ]:
        response = api.put(volumes_path(app, mine["id"], "extend"), json=body)
        assert_fly_error(response, status, word)
    bad_retention = api.post(volumes_path(app, mine["id"]), json={"snapshot_retention": 0})
    assert_fly_error(bad_retention, 422, "snapshot_retention")
    ghost = api.get(volumes_path(app, "vol_0000000000000000"))
    foreign = api.get(volumes_path(app, theirs["id"]))
    assert_fly_error(ghost, 404, "not found")
    assert foreign.text == ghost.text.replace("vol_0000000000000000", theirs["id"])


def test_a_machines_mounts_are_checked(
    server: InProcessServer, api: httpx.Client, app: str, test_image: str
) -> None:
    other_app = unique("vapi-mounts")
    assert api.post("/v1/apps", json={"app_name": other_app}).status_code == 201
    theirs = create(api, other_app)
    elsewhere = insert(server, app, region="far")
    far_host = insert(server, app, host_id="another-host")
    held = insert(server, app, attached_machine_id="0123456789abcd")
    gone = insert(server, app, state=VolumeState.DESTROYED)
    mine = create(api, app, name="mine")

    def machine(*mounts: dict[str, Any]) -> httpx.Response:
        config = {"image": test_image, "mounts": list(mounts)}
        return api.post(f"/v1/apps/{app}/machines", json={"config": config})

    ghost = machine({"volume": "vol_0000000000000000", "path": "/data"})
    foreign = machine({"volume": theirs["id"], "path": "/data"})
    assert_fly_error(ghost, 422, "not found in app")
    assert foreign.text == ghost.text.replace("vol_0000000000000000", theirs["id"])
    assert_fly_error(machine({"volume": gone.id, "path": "/data"}), 422, "not found")
    assert_fly_error(machine({"volume": elsewhere.id, "path": "/d"}), 422, "in region far")
    assert_fly_error(machine({"volume": far_host.id, "path": "/d"}), 422, "another-host")
    assert_fly_error(machine({"volume": held.id, "path": "/d"}), 409, "attached to machine")
    wrong_name = machine({"volume": mine["id"], "path": "/d", "name": "other"})
    assert_fly_error(wrong_name, 422, "named mine")
    assert_fly_error(machine({"volume": mine["id"], "path": "relative"}), 422, "path")
    assert_fly_error(
        machine({"volume": mine["id"], "path": "/d", "extend_threshold_percent": 80}),
        422,
        "extend_threshold_percent",
    )
    assert api.get(f"/v1/apps/{app}/machines").json() == [], "none was created"


def test_org_quotas_bound_volume_count_and_size(server: InProcessServer, api: httpx.Client) -> None:
    org, app = unique("vquota"), unique("vquota-app")
    assert api.post("/v1/orgs", json={"slug": org}).status_code == 201
    quotas = {"volumes": 2, "volume_gb": 3}
    assert api.put(f"/v1/orgs/{org}/quotas", json=quotas).status_code == 200
    assert api.post("/v1/apps", json={"app_name": app, "org_slug": org}).status_code == 201
    first, _second = create(api, app), create(api, app)
    third = api.post(volumes_path(app), json={"name": "data", "encrypted": False})
    assert_fly_error(third, 422, "quota volumes")
    assert third.json()["status"] == "quota_exceeded"
    extend = api.put(volumes_path(app, first["id"], "extend"), json={"size_gb": 3})
    assert_fly_error(extend, 422, "quota volume_gb")
    assert len(api.get(volumes_path(app)).json()) == 2
    usage = api.get(f"/v1/orgs/{org}").json()["usage"]
    assert (usage["volumes"], usage["volume_gb"]) == (2, 2)
    assert api.put(volumes_path(app, first["id"], "extend"), json={"size_gb": 2}).status_code == 200
    assert api.delete(volumes_path(app, first["id"])).status_code == 200
    assert create(api, app)["state"] == "created", "room again once one is destroyed"


def test_an_app_with_volumes_is_not_deleted(api: httpx.Client, app: str) -> None:
    volume = create(api, app)
    assert_fly_error(api.delete(f"/v1/apps/{app}"), 412, "volume")
    assert api.delete(volumes_path(app, volume["id"])).status_code == 200
    assert api.delete(f"/v1/apps/{app}").status_code == 202
    # The destroyed volume went with the app: the name's next app sees nothing of it.
    assert api.post("/v1/apps", json={"app_name": app}).status_code == 201
    listed = api.get(volumes_path(app), params={"include_deleted": "true"})
    assert listed.status_code == 200 and listed.json() == [], listed.text
    assert api.get(volumes_path(app, volume["id"])).status_code == 404


def test_space_beyond_the_hosts_free_space_less_the_reserve_is_refused(
    tmp_path: Path,
) -> None:
    with (
        InProcessServer(tmp_path / "home", net=False, proxy=False, volume_reserve_gb=1e6) as full,
        full.client() as api,
    ):
        assert api.post("/v1/apps", json={"app_name": "full"}).status_code == 201
        refused = api.post(volumes_path("full"), json={"name": "data", "size_gb": 1})
        assert_fly_error(refused, 422, "more than this host can give volumes")
        assert api.get(volumes_path("full")).json() == []
        assert images(full) == []
