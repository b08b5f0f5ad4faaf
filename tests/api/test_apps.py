from __future__ import annotations

import httpx

from tests.api.helpers import assert_fly_error, unique


def test_create_get_list_delete(api: httpx.Client) -> None:
    org = unique("acme")
    assert api.post("/v1/orgs", json={"slug": org, "name": "Acme"}).status_code == 201
    created = api.post("/v1/apps", json={"app_name": "crud-app", "org_slug": org})
    assert created.status_code == 201, created.text
    assert created.json()["organization"] == {"slug": org, "name": "Acme"}
    assert api.get("/v1/apps/crud-app").json()["name"] == "crud-app"
    listed = api.get("/v1/apps", params={"org_slug": org}).json()
    assert [app["name"] for app in listed["apps"]] == ["crud-app"]
    assert listed["total_apps"] == 1
    assert api.delete("/v1/apps/crud-app").status_code == 202
    assert_fly_error(api.get("/v1/apps/crud-app"), 404, "crud-app")


def test_apps_need_an_existing_org(api: httpx.Client) -> None:
    missing = unique("no-such-org")
    assert_fly_error(
        api.post("/v1/apps", json={"app_name": unique("x"), "org_slug": missing}), 404, missing
    )
    assert_fly_error(api.get("/v1/apps", params={"org_slug": missing}), 404, missing)


def test_operator_apps_default_to_the_personal_org(api: httpx.Client) -> None:
    name = unique("mine")
    created = api.post("/v1/apps", json={"app_name": name})
    assert created.status_code == 201, created.text
    assert created.json()["organization"]["slug"] == "personal"


def test_duplicate_app_conflicts(api: httpx.Client) -> None:
    assert api.post("/v1/apps", json={"app_name": "twice"}).status_code == 201
    body = assert_fly_error(api.post("/v1/apps", json={"app_name": "twice"}), 409, "twice")
    assert body["status"] == "name_taken"


def test_bad_app_bodies_name_the_field(api: httpx.Client) -> None:
    assert_fly_error(api.post("/v1/apps", json={"app_name": "Not Valid!"}), 422, "app_name")
    assert_fly_error(api.post("/v1/apps", json={}), 422, "app_name")
    custom = {"name": unique("ok"), "network": "isolated"}
    assert_fly_error(api.post("/v1/apps", json=custom), 422, "network")
    role = {"name": unique("ok"), "app_role_id": "postgres_cluster"}
    assert_fly_error(api.post("/v1/apps", json=role), 422, "app_role_id")
    malformed = api.post(
        "/v1/apps", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_fly_error(malformed, 400, "JSON")


def test_names_with_a_trailing_newline_are_refused(api: httpx.Client, test_image: str) -> None:
    """``^...$`` with ``re.match`` accepts ``"name\\n"``: a second app no URL can address."""
    name = unique("nl")
    assert_fly_error(api.post("/v1/apps", json={"app_name": f"{name}\n"}), 422, "app_name")
    assert_fly_error(api.post("/v1/orgs", json={"slug": f"{name}\n"}), 422, "slug")
    assert api.post("/v1/apps", json={"app_name": name}).status_code == 201
    machine = {"config": {"image": test_image}, "skip_launch": True, "name": "web\n"}
    assert_fly_error(api.post(f"/v1/apps/{name}/machines", json=machine), 422, "name")
    metadata = {"config": {"image": test_image, "metadata": {"role\n": "x"}}, "skip_launch": True}
    assert_fly_error(api.post(f"/v1/apps/{name}/machines", json=metadata), 422, "metadata")
    env = {"config": {"image": test_image, "env": {"MODE\n": "x"}}, "skip_launch": True}
    assert_fly_error(api.post(f"/v1/apps/{name}/machines", json=env), 422, "env")
