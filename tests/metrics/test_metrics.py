"""``/metrics`` of a server built in this process: operator only, one registry per server,
API requests and rate-limit refusals counted, GPUs by state read from the claim record of a
fixture GPU host at scrape time."""

from __future__ import annotations

from pathlib import Path

from hangar.clock import ManualClock
from hangar.model.gpu import GpuState
from tests.api.helpers import assert_fly_error
from tests.devices.sysfs_fixture import build_hgx_h100
from tests.fixtures.embedded import embedded
from tests.metrics.scrape import Scrape

RAISED = "default=10000/10000,get_machine=1/1"


async def test_metrics_are_for_the_operator_and_each_server_has_its_own(tmp_path: Path) -> None:
    one = embedded(tmp_path / "one", rate_limits=RAISED)
    two = embedded(tmp_path / "two", rate_limits=RAISED)
    one.org_with_app("acme", "web")
    async with one.client(one.token("acme")) as api:
        assert_fly_error(await api.get("/metrics"), 403, "operator")
    async with one.client() as api:
        assert_fly_error(await api.get("/metrics"), 401)
    async with one.client(one.operator) as api:
        for _ in range(3):
            assert (await api.get("/v1/apps/web/machines")).status_code == 200
        response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    scraped = Scrape(response.text)
    listed = {"route": "list_machines", "method": "GET", "status": "200"}
    assert scraped.value("hangar_api_requests_total", **listed) == 3
    assert scraped.value("hangar_api_requests_total", route="metrics", status="403") == 1
    assert scraped.value("hangar_api_request_duration_seconds_count", route="list_machines") == 3
    async with two.client(two.operator) as api:
        other = Scrape((await api.get("/metrics")).text)
    assert other.value("hangar_api_requests_total", route="list_machines") == 0
    for name in (
        "hangar_machines",
        "hangar_image_cache_bytes",
        "hangar_image_cache_entries",
        "hangar_placement_attempts_total",
        "hangar_image_cache_lookups_total",
    ):
        assert name in scraped.names(), name


async def test_rate_limit_refusals_are_counted_by_route(tmp_path: Path) -> None:
    server = embedded(tmp_path, rate_limits=RAISED)
    server.org_with_app("acme", "web")
    async with server.client(server.operator) as api:
        get = "/v1/apps/web/machines/0123456789abcd"
        assert (await api.get(get)).status_code == 404
        assert_fly_error(await api.get(get), 429, "get_machine")
        assert_fly_error(await api.get(get), 429)
        scraped = Scrape((await api.get("/metrics")).text)
    assert scraped.value("hangar_api_rate_limited_total", route="get_machine") == 2
    assert scraped.value("hangar_api_requests_total", route="get_machine", status="429") == 2


async def test_gpus_by_state_move_when_one_is_quarantined(tmp_path: Path) -> None:
    build_hgx_h100(tmp_path / "sys")
    clock = ManualClock()
    server = embedded(
        tmp_path / "home", clock, rate_limits=RAISED, sysfs_root=tmp_path / "sys", nvml=False
    )
    agent = server.server.agent
    await agent.start()
    try:
        async with server.client(server.operator) as api:
            before = Scrape((await api.get("/metrics")).text)
            host = server.server.host.id
            assert before.value("hangar_gpus", host=host, kind="h100-sxm", state="free") == 8
            assert before.value("hangar_gpus", state="quarantined") == 0
            assert before.value("hangar_hosts", pool="gpu") == 1
            bdf = agent.host.placement.gpus()[5].bdf
            assert agent.host.placement.set_gpu_state(bdf, GpuState.QUARANTINED, GpuState.FREE)
            after = Scrape((await api.get("/metrics")).text)
        assert after.value("hangar_gpus", host=host, kind="h100-sxm", state="free") == 7
        assert after.value("hangar_gpus", host=host, kind="h100-sxm", state="quarantined") == 1
    finally:
        await agent.close()
