"""Assertions and names shared by the API tests."""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx

from hangar.model.run import RunStatus


def assert_fly_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "status"}, body
    assert isinstance(body["status"], str) and body["status"]
    assert isinstance(body["error"], str) and body["error"]
    for word in words:
        assert word in body["error"], body
    return body


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def wait_runs_finished(
    api: httpx.Client, app_name: str, machine_id: str, guard_s: float = 120.0
) -> None:
    """Until the agent has no run of the machine in progress (``guard_s`` only stops a hang)."""
    deadline = time.monotonic() + guard_s
    path = f"/v1/apps/{app_name}/machines/{machine_id}/runs"
    while time.monotonic() < deadline:
        runs = api.get(path).json()
        if all(not RunStatus(run["status"]).unfinished for run in runs):
            return
        time.sleep(0.05)
    raise AssertionError(f"runs of {machine_id} still in progress: {runs}")
