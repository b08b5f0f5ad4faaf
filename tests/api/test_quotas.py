"""Per-org quotas: a request past one gets a Fly-shaped 422 naming it, and nothing is made."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.helpers import assert_fly_error, unique


def quota_org(api: httpx.Client, **quotas: Any) -> tuple[str, str]:
    org, app = unique("quota"), unique("quota-app")
    assert api.post("/v1/orgs", json={"slug": org}).status_code == 201
    assert api.post("/v1/apps", json={"app_name": app, "org_slug": org}).status_code == 201
    response = api.put(f"/v1/orgs/{org}/quotas", json=quotas)
    assert response.status_code == 200, response.text
    return org, app


def create(api: httpx.Client, app: str, image: str, **guest: Any) -> httpx.Response:
    config = {"image": image, "guest": {"cpus": 1, "memory_mb": 256, **guest}}
    return api.post(f"/v1/apps/{app}/machines", json={"config": config, "skip_launch": True})


def machine_ids(api: httpx.Client, app: str) -> list[str]:
    return [machine["id"] for machine in api.get(f"/v1/apps/{app}/machines").json()]


def test_machine_quota_refuses_the_one_too_many_and_frees_on_destroy(
    api: httpx.Client, test_image: str
) -> None:
    org, app = quota_org(api, machines=1)
    first = create(api, app, test_image)
    assert first.status_code == 200, first.text
    body = assert_fly_error(create(api, app, test_image), 422, "quota machines", org)
    assert body["status"] == "quota_exceeded"
    assert machine_ids(api, app) == [first.json()["id"]]
    usage = api.get(f"/v1/orgs/{org}").json()["usage"]
    assert usage == {"machines": 1, "memory_mb": 256, "gpus": {}, "volumes": 0, "volume_gb": 0}
    machine = f"/v1/apps/{app}/machines/{first.json()['id']}"
    assert api.delete(machine).status_code == 200
    assert (
        api.get(f"{machine}/wait", params={"state": "destroyed", "timeout": 30}).status_code == 200
    )
    assert create(api, app, test_image).status_code == 200


def test_memory_quota_counts_what_an_update_adds(api: httpx.Client, test_image: str) -> None:
    _org, app = quota_org(api, memory_mb=512)
    first = create(api, app, test_image).json()["id"]
    assert_fly_error(create(api, app, test_image, memory_mb=384), 422, "quota memory_mb")
    assert machine_ids(api, app) == [first]
    update = {"config": {"image": test_image, "guest": {"memory_mb": 512}}, "skip_launch": True}
    assert api.post(f"/v1/apps/{app}/machines/{first}", json=update).status_code == 200
    update["config"]["guest"] = {"memory_mb": 576}  # type: ignore[index]
    assert_fly_error(api.post(f"/v1/apps/{app}/machines/{first}", json=update), 422, "memory_mb")


def test_gpu_quota_is_per_kind_and_checked_before_placement(
    api: httpx.Client, test_image: str
) -> None:
    _org, app = quota_org(api, gpus={"l40s": 0})
    gpu = {"gpu_kind": "l40s", "gpus": 1, "cpu_kind": "performance"}
    assert_fly_error(create(api, app, test_image, **gpu), 422, "quota gpus.l40s")
    assert machine_ids(api, app) == []
    other_kind = create(api, app, test_image, **{**gpu, "gpu_kind": "a10"})
    assert other_kind.status_code == 422 and "quota" not in other_kind.text


def test_quotas_are_validated(api: httpx.Client) -> None:
    org, _app = quota_org(api)
    assert_fly_error(api.put(f"/v1/orgs/{org}/quotas", json={"machines": -1}), 422, "machines")
    assert_fly_error(api.put(f"/v1/orgs/{org}/quotas", json={"gpus": {"h9000": 1}}), 422, "h9000")
    assert_fly_error(api.put(f"/v1/orgs/{unique('none')}/quotas", json={}), 404, "org")
