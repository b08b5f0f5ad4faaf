"""The org usage that quotas read comes from counters the machine writes keep: after creates,
updates and destroys through the API, failed ones among them, the counters equal a recount of
every machine. And ``list`` pages on request: ``limit``/``after``, a ``Link`` to the next page,
a 422 naming the parameter for a bad value."""

from __future__ import annotations

from typing import Any

import httpx

from hangar.model.footprint import Footprint
from tests.api.helpers import assert_fly_error, unique, wait_runs_finished
from tests.api.test_quotas import create, quota_org
from tests.fixtures.inprocess import InProcessServer
from tests.store.test_contracts import recount


def counted(api: httpx.Client, org: str) -> Footprint:
    usage: dict[str, Any] = api.get(f"/v1/orgs/{org}").json()["usage"]
    return Footprint(**{name: usage[name] for name in ("machines", "memory_mb", "gpus")})


def test_counters_equal_a_recount_after_creates_updates_and_destroys(
    api: httpx.Client, api_server: InProcessServer, test_image: str
) -> None:
    store = api_server.embedded.stores.machines
    org, app = quota_org(api, machines=3, memory_mb=4096)
    ids = [create(api, app, test_image, memory_mb=256 * (n + 1)).json()["id"] for n in range(2)]
    path = f"/v1/apps/{app}/machines"
    # Failed creates: a name in use, more CPUs than the host has, past the quota.
    named = api.get(f"{path}/{ids[0]}").json()["name"]
    taken = api.post(
        path, json={"name": named, "config": {"image": test_image}, "skip_launch": True}
    )
    assert taken.status_code == 409, taken.text
    assert_fly_error(create(api, app, test_image, cpus=64), 422, "cpus")
    ids.append(create(api, app, test_image, memory_mb=768).json()["id"])
    assert_fly_error(create(api, app, test_image), 422, "quota machines")
    assert counted(api, org) == Footprint(machines=3, memory_mb=1536)

    # Updates: one that fits, one past the memory quota, one whose image cannot be resolved.
    grow = {"config": {"image": test_image, "guest": {"memory_mb": 512}}, "skip_launch": True}
    assert api.post(f"{path}/{ids[0]}", json=grow).status_code == 200
    wait_runs_finished(api, app, ids[0])
    too_much = {"config": {"image": test_image, "guest": {"memory_mb": 4096}}, "skip_launch": True}
    assert_fly_error(api.post(f"{path}/{ids[1]}", json=too_much), 422, "quota memory_mb")
    missing = f"oci:{api_server.home}/no-such-layout:latest"
    broken = {"config": {"image": missing, "guest": {"memory_mb": 128}}, "skip_launch": True}
    api.post(f"{path}/{ids[1]}", json=broken)
    wait_runs_finished(api, app, ids[1])

    # Destroys: one that works, one of a machine already destroyed, one of no machine.
    assert api.delete(f"{path}/{ids[2]}").status_code == 200
    wait = api.get(f"{path}/{ids[2]}/wait", params={"state": "destroyed", "timeout": 30})
    assert wait.status_code == 200, wait.text
    assert api.delete(f"{path}/{ids[2]}").status_code in (404, 412)
    assert api.delete(f"{path}/{unique('none')}").status_code == 404
    for machine_id in ids:
        wait_runs_finished(api, app, machine_id)

    assert counted(api, org) == recount(store, org)
    assert counted(api, org).machines == 2
    assert create(api, app, test_image).status_code == 200  # the destroyed one's room is free
    assert counted(api, org) == recount(store, org)


def test_list_pages_with_limit_and_after(api: httpx.Client, test_image: str) -> None:
    _org, app = quota_org(api)
    ids = [create(api, app, test_image).json()["id"] for _ in range(5)]
    path = f"/v1/apps/{app}/machines"
    whole = api.get(path)
    assert [m["id"] for m in whole.json()] == ids and "link" not in whole.headers

    seen: list[str] = []
    response = api.get(path, params={"limit": 2})
    pages = 0
    while True:
        assert response.status_code == 200, response.text
        seen += [m["id"] for m in response.json()]
        pages += 1
        link = response.headers.get("link")
        if link is None:
            break
        assert link.endswith('>; rel="next"')
        response = api.get(link.removeprefix("<").split(">;")[0])
    assert seen == ids and pages == 3

    started = api.get(path, params={"limit": 2, "state": "created", "after": ids[3]})
    assert [m["id"] for m in started.json()] == ids[4:]
    assert "link" not in started.headers


def test_bad_page_parameters_are_a_422_naming_them(api: httpx.Client, test_image: str) -> None:
    _org, app = quota_org(api)
    other_org, other_app = quota_org(api)
    foreign = create(api, other_app, test_image).json()["id"]
    path = f"/v1/apps/{app}/machines"
    for limit in ("0", "1001", "-1", "ten", "1e3", " "):
        assert_fly_error(api.get(path, params={"limit": limit}), 422, "limit")
    assert_fly_error(api.get(path, params={"limit": 10, "after": foreign}), 422, "after")
    assert_fly_error(api.get(path, params={"limit": 10, "after": "nope"}), 422, "after")
    assert_fly_error(api.get(path, params={"after": foreign}), 422, "after")
    assert other_org != _org
