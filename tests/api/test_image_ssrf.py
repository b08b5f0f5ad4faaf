"""A tenant's ``config.image`` cannot make the host connect to itself: the machine fails
with a short fixed reason, and the service there never sees a request."""

from __future__ import annotations

import httpx

from tests.agent.helpers import wait_state
from tests.fixtures.hostile import Answer, http_service

SECRET = b"INTERNAL-ADMIN-PAGE"


def test_an_image_on_this_hosts_loopback_is_refused(api: httpx.Client, app_name: str) -> None:
    def internal(_path: str) -> Answer:
        return 200, {}, SECRET

    with http_service(internal) as service:
        config = {"image": f"{service.authority}/admin:latest", "restart": {"policy": "no"}}
        created = api.post(f"/v1/apps/{app_name}/machines", json={"config": config})
        assert created.status_code == 200, created.text
        failed = wait_state(api, app_name, created.json()["id"], "failed")
        assert service.paths == []
    reason = failed["failure_reason"]
    assert "refused" in reason and "loopback" in reason, reason
    assert SECRET.decode() not in reason
