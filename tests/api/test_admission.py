"""One tenant must not take what the host has for all: host-wide admission (with the
operator's overcommit), default quotas for new orgs, quotas that count pending updates, and
capacity answers that show no org another's usage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from hangar.model.config import GuestConfig
from hangar.model.host import HostInfo
from hangar.model.run import StartRequest
from hangar.scheduler.machines import MILLI_PER_CORE, Overcommit, cpu_milli, host_state
from hangar.scheduler.machines import memory_mb as claimed_memory_mb
from tests.agent.helpers import machine_path, wait_state
from tests.api.conftest import create_token
from tests.api.helpers import assert_fly_error, unique, wait_runs_finished
from tests.fixtures.inprocess import InProcessServer


def allocatable_mb(server: InProcessServer) -> int:
    return server.embedded.host.allocatable_memory_mb


def more_than_half(server: InProcessServer) -> int:
    """A memory size (a multiple of 64 MB) two machines of which do not fit on this host."""
    return (allocatable_mb(server) * 11 // 20) // 64 * 64 + 64


@contextmanager
def claimed(server: InProcessServer, machine_id: str, memory_mb: int) -> Iterator[None]:
    """A claim on this host's record, as a running machine of another org holds one."""
    placement = server.embedded.agent.host.placement

    async def place() -> None:
        placement.place(machine_id, GuestConfig(memory_mb=memory_mb))

    async def release() -> None:
        placement.release(machine_id)

    server.call(place())
    try:
        yield
    finally:
        server.call(release())


def org_with_app(api: httpx.Client, **quotas: Any) -> tuple[str, str]:
    org, app = unique("adm"), unique("adm-app")
    assert api.post("/v1/orgs", json={"slug": org}).status_code == 201
    if quotas:
        assert api.put(f"/v1/orgs/{org}/quotas", json=quotas).status_code == 200
    assert api.post("/v1/apps", json={"app_name": app, "org_slug": org}).status_code == 201
    return org, app


def test_a_machine_that_does_not_fit_on_the_host_is_refused_at_create_and_start(
    api_server: InProcessServer, api: httpx.Client, test_image: str
) -> None:
    big = more_than_half(api_server)
    _org, app = org_with_app(api, memory_mb=None)
    config = {"image": test_image, "guest": {"memory_mb": big}}
    parked = api.post(f"/v1/apps/{app}/machines", json={"config": config, "skip_launch": True})
    assert parked.status_code == 200, parked.text
    parked_id = parked.json()["id"]
    wait_runs_finished(api, app, parked_id)
    with claimed(api_server, unique("other-org-machine"), big):
        refused = api.post(f"/v1/apps/{app}/machines", json={"config": config})
        body = assert_fly_error(refused, 422, "insufficient resources", f"{big} MB")
        assert body["status"] == "insufficient_capacity"
        start = api.post(machine_path(app, parked_id) + "/start")
        assert_fly_error(start, 422, "insufficient resources")
        # A start that got past the API (a race) ends failed, with the same reason.
        agent = api_server.embedded.agent

        async def submit() -> None:
            agent.submit_operation(parked_id, StartRequest())

        api_server.call(submit())
        failed = wait_state(api, app, parked_id, "failed")
        assert "insufficient resources" in failed["failure_reason"], failed


def test_overcommit_admits_more_shared_machines_but_never_more_dedicated_ones() -> None:
    host = HostInfo(id="h", region="r", cpus=2, memory_mb=4096 + 512)
    shared = GuestConfig(cpus=1, memory_mb=1024)
    performance = GuestConfig(cpu_kind="performance", cpus=1, memory_mb=1024)
    gpu = GuestConfig(cpu_kind="performance", gpu_kind="l40s", gpus=1, memory_mb=1024)
    plain = host_state(host, [])
    doubled = Overcommit(cpu=2.0, memory=1.5)
    over = host_state(host, [], overcommit=doubled)
    assert (plain.cpu_milli, plain.memory_mb) == (2 * MILLI_PER_CORE, 4096)
    assert (over.cpu_milli, over.memory_mb) == (4 * MILLI_PER_CORE, 6144)
    # Shared vCPUs and memory: more fit. Performance vCPUs and GPU memory: the same share.
    assert cpu_milli(shared, doubled) == cpu_milli(shared)
    assert cpu_milli(performance, doubled) / over.cpu_milli == cpu_milli(performance) / (
        plain.cpu_milli
    )
    assert claimed_memory_mb(shared, doubled) == 1024
    assert claimed_memory_mb(gpu, doubled) / over.memory_mb == 1024 / plain.memory_mb


def test_new_orgs_get_the_operators_default_quotas(tmp_path: Any) -> None:
    with (
        InProcessServer(
            tmp_path,
            default_org_machines=2,
            default_org_memory_mb=1024,
            default_org_gpus={"a10": 1},
        ) as server,
        server.client() as api,
    ):
        org = unique("dflt")
        created = api.post("/v1/orgs", json={"slug": org})
        assert created.status_code == 201, created.text
        assert created.json()["quotas"] == {
            "machines": 2,
            "memory_mb": 1024,
            "gpus": {"a10": 1},
            "volumes": None,
            "volume_gb": None,
        }
        assert api.get("/v1/orgs/personal").json()["quotas"]["machines"] == 2
        changed = api.put(f"/v1/orgs/{org}/quotas", json={"machines": 5})
        assert changed.json()["quotas"]["machines"] == 5


def test_updates_pending_behind_a_stop_count_in_the_quota(
    api: httpx.Client, test_image: str
) -> None:
    """1024 MB quota: two 256 MB machines updated to 768 MB while they stop, and a third
    of 512 MB, must not all be accepted."""
    _org, app = org_with_app(api, memory_mb=1024)
    slow_to_stop = {
        "image": test_image,
        "init": {"cmd": ["sh", "-c", "trap '' TERM; while :; do sleep 1; done"]},
        "restart": {"policy": "no"},
        "stop_config": {"timeout": "20s"},
        "guest": {"memory_mb": 256},
    }
    ids = []
    for _ in range(2):
        created = api.post(f"/v1/apps/{app}/machines", json={"config": slow_to_stop})
        assert created.status_code == 200, created.text
        ids.append(created.json()["id"])
    try:
        for machine_id in ids:
            wait_state(api, app, machine_id, "started")
        bigger = {"config": {**slow_to_stop, "guest": {"memory_mb": 768}}}
        first = api.post(machine_path(app, ids[0]), json=bigger)
        assert first.status_code == 200, first.text
        second = api.post(machine_path(app, ids[1]), json=bigger)
        assert_fly_error(second, 422, "quota memory_mb")
        third = api.post(
            f"/v1/apps/{app}/machines",
            json={
                "config": {"image": test_image, "guest": {"memory_mb": 512}},
                "skip_launch": True,
            },
        )
        assert_fly_error(third, 422, "quota memory_mb")
        usage = api.get(f"/v1/orgs/{_org}").json()["usage"]
        assert usage["memory_mb"] == 768 + 256
    finally:
        for machine_id in ids:
            api.delete(machine_path(app, machine_id), params={"force": "true"})
        # Their claims are gone before the next test reads what the host has left.
        for machine_id in ids:
            wait_state(api, app, machine_id, "destroyed")


def test_capacity_answers_show_an_org_nothing_of_other_orgs(
    api_server: InProcessServer, api: httpx.Client
) -> None:
    org, _app = org_with_app(api, machines=3)
    with api_server.client(create_token(api, org_slug=org, read_only=True)) as reader:
        body = {"guest": {"cpus": 1, "memory_mb": 256}, "count": 1000}

        def answers() -> tuple[int, int, Any]:
            mine = reader.post("/v1/platform/placements", json=body)
            assert mine.status_code == 200, mine.text
            operator = api.post("/v1/platform/placements", json=body).json()
            regions = reader.get("/v1/platform/regions").json()
            return (
                mine.json()["regions"][0]["placeable"],
                operator["regions"][0]["placeable"],
                (regions),
            )

        before_mine, before_operator, before_regions = answers()
        assert before_mine == 3, "within the org's quota of 3 machines"
        with claimed(api_server, unique("elsewhere"), more_than_half(api_server)):
            after_mine, after_operator, after_regions = answers()
        assert (after_mine, after_regions) == (before_mine, before_regions)
        assert after_operator < before_operator, "the operator sees what the host has left"
        unknown_kind = reader.get("/v1/platform/regions", params={"gpu_kind": "h9000"})
        assert (
            unknown_kind.status_code == 200 and unknown_kind.json()["regions"][0]["capacity"] == 0
        )
