"""``/metrics`` of a real ``hangar server`` while a real machine (a QEMU guest) starts and
stops: the gauges, counters and histograms move with it."""

from __future__ import annotations

import httpx
import pytest

from hangar.server_process import ServerProcess
from tests.agent.helpers import machine_path, run_machine, wait_state
from tests.api.helpers import wait_runs_finished
from tests.metrics.scrape import Scrape

pytestmark = pytest.mark.slow

SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]


def scrape(api: httpx.Client) -> Scrape:
    response = api.get("/metrics")
    assert response.status_code == 200, response.text
    return Scrape(response.text)


def test_metrics_move_when_a_machine_starts_and_stops(
    api: httpx.Client, app_name: str, test_image: str, shared_server: ServerProcess
) -> None:
    before = scrape(api)
    machine_id = run_machine(api, app_name, test_image, cmd=SLEEPER)
    wait_state(api, app_name, machine_id, "started")
    wait_runs_finished(api, app_name, machine_id)
    started = scrape(api)

    def moved(name: str, **labels: str) -> float:
        return started.value(name, **labels) - before.value(name, **labels)

    assert moved("hangar_machines", state="started") == 1
    assert moved("hangar_operations_total", operation="create", status="succeeded") == 1
    assert moved("hangar_operation_duration_seconds_count", operation="create") == 1
    for step in ("resolve_image", "place_machine", "prepare_root_disk", "launch_vm"):
        assert moved("hangar_step_duration_seconds_count", operation="create", step=step) == 1
    assert (
        started.value("hangar_step_duration_seconds_sum", operation="create", step="launch_vm") > 0
    )
    assert moved("hangar_guest_start_seconds_count", mode="boot") == 1
    assert moved("hangar_placement_attempts_total", outcome="placed") == 1
    assert moved("hangar_image_cache_lookups_total") == 1
    assert started.value("hangar_image_cache_entries") >= 1
    assert started.value("hangar_image_cache_bytes") > 0
    assert moved("hangar_api_requests_total", route="create_machine", status="200") == 1

    stop = api.post(machine_path(app_name, machine_id) + "/stop", json={"timeout": "5s"})
    assert stop.status_code == 200, stop.text
    wait_state(api, app_name, machine_id, "stopped")
    wait_runs_finished(api, app_name, machine_id)
    stopped = scrape(api)
    assert stopped.value("hangar_machines", state="started") == before.value(
        "hangar_machines", state="started"
    )
    assert (
        stopped.value("hangar_machines", state="stopped")
        - before.value("hangar_machines", state="stopped")
        == 1
    )
    assert (
        stopped.value("hangar_operations_total", operation="stop", status="succeeded")
        - before.value("hangar_operations_total", operation="stop", status="succeeded")
        == 1
    )
    assert stopped.value("hangar_step_duration_seconds_count", operation="stop", step="stop_vm") > 0
    api.delete(machine_path(app_name, machine_id), params={"force": "true"})
