from __future__ import annotations

import httpx


def assert_fly_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "status"}
    assert isinstance(body["status"], str) and body["status"]
    for word in words:
        assert word in body["error"], body


def test_create_get_list_delete(api: httpx.Client) -> None:
    created = api.post("/v1/apps", json={"app_name": "crud-app", "org_slug": "acme"})
    assert created.status_code == 201, created.text
    assert created.json()["organization"]["slug"] == "acme"
    assert api.get("/v1/apps/crud-app").json()["name"] == "crud-app"
    listed = api.get("/v1/apps", params={"org_slug": "acme"}).json()
    assert [app["name"] for app in listed["apps"]] == ["crud-app"]
    assert listed["total_apps"] == 1
    assert api.delete("/v1/apps/crud-app").status_code == 202
    assert_fly_error(api.get("/v1/apps/crud-app"), 404, "crud-app")


def test_duplicate_app_conflicts(api: httpx.Client) -> None:
    assert api.post("/v1/apps", json={"app_name": "twice"}).status_code == 201
    assert_fly_error(api.post("/v1/apps", json={"app_name": "twice"}), 409, "twice")


def test_bad_app_bodies_name_the_field(api: httpx.Client) -> None:
    assert_fly_error(api.post("/v1/apps", json={"app_name": "Not Valid!"}), 422, "app_name")
    assert_fly_error(api.post("/v1/apps", json={}), 422, "app_name")
    assert_fly_error(api.post("/v1/apps", json={"app_name": "ok", "extra": 1}), 422, "extra")
    malformed = api.post(
        "/v1/apps", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_fly_error(malformed, 400, "JSON")
