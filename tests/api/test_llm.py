"""``/v1/orgs/{org}/llm/deployments`` without guests: every refusal before anything is
written, the deployment's shape, scale bounds, keys, and the gateway's authenticator over
hangar's own tokens."""

from __future__ import annotations

import asyncio

import httpx

from hangar.api.services.llm import HangarAuthenticator
from tests.api.conftest import Tenants
from tests.api.helpers import assert_fly_error
from tests.fixtures.inprocess import InProcessServer


def path(org: str, name: str = "", verb: str = "") -> str:
    return (
        f"/v1/orgs/{org}/llm/deployments"
        + (f"/{name}" if name else "")
        + (f"/{verb}" if verb else "")
    )


def test_bad_deployments_are_refused_and_leave_nothing(api: httpx.Client, tenants: Tenants) -> None:
    org = tenants.a.org
    cases = [
        ({"name": "Bad Name", "model": "vol:w"}, 422, "name"),
        ({"name": "m", "model": "relative.gguf"}, 400, "model"),
        ({"name": "m", "model": "/etc/passwd"}, 422, "model"),
        ({"name": "m", "model": "vol:w", "min_replicas": 3, "max_replicas": 1}, 422, "min"),
        ({"name": "m", "model": "vol:w", "engine": "image"}, 422, "image"),
        ({"name": "m", "model": "vol:nothing-here"}, 422, "model"),
        ({"name": "m", "model": "vol:w", "memory_mb": 100}, 422, "memory_mb"),
        ({"name": "m", "model": "vol:w", "gpu_kind": "l40s"}, 422, "gpus"),
    ]
    for body, status, word in cases:
        response = api.post(path(org), json=body)
        assert_fly_error(response, status)
        assert word in response.json()["error"], response.text
    assert api.get(path(org)).json() == []
    assert api.get("/v1/apps/llm-m").status_code == 404, "no app left behind"
    assert_fly_error(api.post(path("no-such-org"), json={"name": "m", "model": "x"}), 404)


def test_an_image_deployment_lists_scales_keys_and_destroys(
    api_server: InProcessServer, api: httpx.Client, tenants: Tenants, test_image: str
) -> None:
    org = tenants.a.org
    created = api.post(
        path(org),
        json={"name": "echo", "model": "vol:w", "engine": "image", "image": test_image},
    )
    # The volume does not exist: refused before anything is written.
    assert_fly_error(created, 422)
    created = api.post(
        path(org),
        json={"name": "echo", "model": "/models/x.gguf", "engine": "image", "image": test_image},
    )
    assert created.status_code == 201, created.text
    view = created.json()
    assert (view["app"], view["engine"], view["replicas"]) == ("llm-echo", "image", [])
    assert view["usage"] == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    assert_fly_error(api.post(path(org), json={"name": "echo", "model": "/m.gguf"}), 409)

    org_token = tenants.a.tokens["org"]
    with api_server.client(org_token) as member:
        assert [d["name"] for d in member.get(path(org)).json()] == ["echo"]
        scaled = member.post(path(org, "echo", "scale"), json={"max_replicas": 3})
        assert scaled.json()["max_replicas"] == 3
        assert_fly_error(member.post(path(org, "echo", "scale"), json={"min_replicas": 4}), 400)
        key = member.post(path(org, "echo", "keys"))
        assert key.status_code == 201, key.text
        secret = key.json()["key"]
    with api_server.client(tenants.b.tokens["org"]) as foreign:
        assert_fly_error(foreign.get(path(org, "echo")), 404)
        assert_fly_error(foreign.post(path(org, "echo", "keys")), 404)

    store = api_server.embedded.stores.llm
    auth = HangarAuthenticator(api_server.embedded.tokens, store)
    by_key = asyncio.run(auth.authenticate(secret))
    echo = store.deployment_named(org, "echo")
    assert echo is not None
    assert by_key is not None and (by_key.org, by_key.deployment) == (org, echo.id)
    by_org = asyncio.run(auth.authenticate(org_token))
    assert by_org is not None and (by_org.org, by_org.deployment) == (org, None)
    assert asyncio.run(auth.authenticate(tenants.a.tokens["app"])) is None, "org tokens only"
    assert asyncio.run(auth.authenticate(api_server.operator_token)) is None
    assert asyncio.run(auth.authenticate("hgl_" + "x" * 43)) is None
    assert asyncio.run(auth.authenticate(tenants.a.tokens["revoked"])) is None

    assert api.delete(path(org, "echo")).status_code == 204
    assert api.get(path(org)).json() == []
    assert asyncio.run(auth.authenticate(secret)) is None, "its keys went with it"
    assert api.delete("/v1/apps/llm-echo").status_code in (200, 202, 204)
