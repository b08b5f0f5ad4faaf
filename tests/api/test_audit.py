"""The audit log: mutating calls and operator actions, with token, org, action, target and
outcome; each org reads its own records, the operator all of them."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.conftest import Tenants
from tests.api.helpers import assert_fly_error, unique


def records(client: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/v1/audit", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["records"]
    return found


def test_mutating_calls_are_recorded_with_who_what_and_how_it_ended(
    api: httpx.Client, tenants: Tenants, as_token: Any, test_image: str
) -> None:
    a = tenants.a
    created = api.post("/v1/tokens", json={"org_slug": a.org, "description": "audit test"})
    token_id, secret = created.json()["id"], created.json()["token"]
    client = as_token(secret)
    machine = client.post(
        f"/v1/apps/{a.app}/machines", json={"config": {"image": test_image}, "skip_launch": True}
    )
    machine_id = machine.json()["id"]
    assert client.get(f"/v1/apps/{a.app}/machines/{machine_id}").status_code == 200
    assert_fly_error(client.post(f"/v1/apps/{a.app}/machines/{machine_id}/restart"), 412)
    assert_fly_error(client.post(f"/v1/apps/{tenants.b.app}/machines/{machine_id}/stop"), 404)

    mine = [record for record in records(api) if record["token_id"] == token_id]
    summary = [(r["action"], r["org_slug"], r["outcome"], r["status"]) for r in reversed(mine)]
    assert summary == [
        ("create_machine", a.org, "ok", 200),
        ("restart_machine", a.org, "rejected", 412),
        ("stop_machine", a.org, "denied", 404),
    ]
    assert mine[-1]["app_name"] == a.app and mine[-1]["machine_id"] == machine_id
    assert f"machine_id={machine_id}" in mine[-1]["target"]
    assert mine[0]["app_name"] == tenants.b.app
    assert all(record["action"] != "get_machine" for record in mine)


def test_operator_actions_and_anonymous_attempts_are_recorded(
    api: httpx.Client, api_server: Any
) -> None:
    org = unique("audited")
    assert api.post("/v1/orgs", json={"slug": org}).status_code == 201
    assert api.put(f"/v1/orgs/{org}/quotas", json={"machines": 3}).status_code == 200
    operator_records = records(api, org_slug=org)
    assert [record["action"] for record in operator_records] == ["set_org_quotas", "create_org"]
    assert all(record["outcome"] == "ok" for record in operator_records)
    with api_server.client(anonymous=True) as anonymous:
        assert anonymous.post("/v1/orgs", json={"slug": org}).status_code == 401
    anonymous = [r for r in records(api) if r["token_id"] == "" and r["action"] == "create_org"]
    assert anonymous and anonymous[0]["outcome"] == "denied" and anonymous[0]["status"] == 401


def test_each_org_reads_only_its_own_records(
    api: httpx.Client, tenants: Tenants, as_token: Any
) -> None:
    a, b = tenants.a, tenants.b
    as_token(a.tokens["org"]).post(f"/v1/apps/{a.app}/machines/{a.machine_id}/stop")
    seen_by_b = records(as_token(b.tokens["org_read_only"]))
    assert seen_by_b and {record["org_slug"] for record in seen_by_b} == {b.org}
    assert_fly_error(as_token(b.tokens["org"]).get("/v1/audit", params={"org_slug": a.org}), 404)
    assert_fly_error(as_token(a.tokens["app"]).get("/v1/audit"), 403)
    assert {record["org_slug"] for record in records(as_token(a.tokens["org"]))} == {a.org}
