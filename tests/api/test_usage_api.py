"""``GET /v1/orgs/{org}/usage``: seconds and cost by app, machine or GPU kind over a window,
at the operator's prices; what each kind of token may read. Intervals are written to the
server's own usage store as its agent writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from hangar.clock import ManualClock
from hangar.model.usage import UsageInterval, UsageSubject
from tests.api.helpers import assert_fly_error
from tests.fixtures.embedded import Embedded, embedded

NOW = 1_800_000_000.0
HOUR = 3600.0


def machine(
    interval_id: str,
    org: str,
    app: str,
    start: float,
    end: float,
    gpu_kind: str = "",
    gpus: float = 0.0,
) -> UsageInterval:
    return UsageInterval(
        id=interval_id,
        subject=UsageSubject.MACHINE,
        org=org,
        app=app,
        machine_id=interval_id.split(".")[0],
        host="h1",
        region="ord",
        cpu_kind="performance" if gpus else "shared",
        cpus=4 if gpus else 1,
        memory_mb=8192 if gpus else 1024,
        gpu_kind=gpu_kind,
        gpus=gpus,
        started_at=start,
        until=end,
        closed=True,
    )


@pytest.fixture
def metered(tmp_path: Path) -> Embedded:
    server = embedded(
        tmp_path,
        ManualClock(NOW),
        prices="gpu:h100-sxm=3.0,cpu:performance=0.04,cpu:shared=0.01,memory_gb=0.005",
    )
    server.org_with_app("acme", "infer")
    server.org_with_app("acme", "web")
    server.org_with_app("globex", "shop")
    usage = server.server.stores.usage
    for interval in [
        machine("g1.1.1", "acme", "infer", NOW - 2 * HOUR, NOW - HOUR, "h100-sxm", 2.0),
        machine("g2.1.1", "acme", "infer", NOW - 1.5 * HOUR, NOW - 0.5 * HOUR, "h200", 0.5),
        machine("w1.1.1", "acme", "web", NOW - 40 * 24 * HOUR, NOW - 0.25 * HOUR),
        machine("s1.1.1", "globex", "shop", NOW - HOUR, NOW),
    ]:
        usage.open_interval(interval)
    return server


async def test_usage_by_gpu_kind_prices_each_resource(metered: Embedded) -> None:
    async with metered.client(metered.operator) as api:
        response = await api.get(
            "/v1/orgs/acme/usage",
            params={"from": NOW - 3 * HOUR, "to": "2027-01-15T08:00:00Z", "group_by": "gpu_kind"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["org"] == "acme" and body["currency"] == "USD"
    assert (body["from"], body["to"]) == ("2027-01-15T05:00:00.000Z", "2027-01-15T08:00:00.000Z")
    groups = {group["key"]: group for group in body["groups"]}
    assert set(groups) == {"h100-sxm", "h200", "none"}
    h100 = groups["h100-sxm"]
    assert h100["seconds"] == HOUR and h100["gpu_seconds"] == 2 * HOUR
    assert h100["cost"] == pytest.approx(2 * 3.0 + 4 * 0.04 + 8 * 0.005)
    assert groups["h200"]["gpu_seconds"] == 0.5 * HOUR
    assert groups["none"]["seconds"] == 2.75 * HOUR
    assert body["total"]["seconds"] == HOUR + HOUR + 2.75 * HOUR
    assert body["unpriced"] == ["gpu:h200"]


async def test_usage_by_app_and_machine_clips_to_the_window(metered: Embedded) -> None:
    async with metered.client(metered.operator) as api:
        by_app = (await api.get("/v1/orgs/acme/usage", params={"group_by": "app"})).json()
        by_machine = (
            await api.get(
                "/v1/orgs/acme/usage",
                params={"group_by": "machine", "from": NOW - HOUR, "to": NOW},
            )
        ).json()
    apps = {group["key"]: group["seconds"] for group in by_app["groups"]}
    # The default window is the last 30 days: w1 started 40 days ago and counts from then.
    assert apps == {"infer": 2 * HOUR, "web": 30 * 24 * HOUR - 0.25 * HOUR}
    machines = {group["key"]: group["seconds"] for group in by_machine["groups"]}
    assert machines == {"g2": 0.5 * HOUR, "w1": 0.75 * HOUR}


async def test_what_each_token_may_read(metered: Embedded) -> None:
    acme = metered.token("acme")
    async with metered.client(acme) as api:
        own = await api.get("/v1/orgs/acme/usage")
        assert own.status_code == 200
        assert {g["key"] for g in own.json()["groups"]} == {"infer", "web"}
        foreign = await api.get("/v1/orgs/globex/usage")
        missing = await api.get("/v1/orgs/nobody/usage")
    assert_fly_error(foreign, 404, "globex")
    assert foreign.json()["status"] == missing.json()["status"]
    async with metered.client(metered.token("acme", app="web")) as api:
        assert_fly_error(await api.get("/v1/orgs/acme/usage"), 403)
    async with metered.client(metered.token("acme", read_only=True)) as api:
        assert (await api.get("/v1/orgs/acme/usage")).status_code == 200
    async with metered.client() as api:
        assert_fly_error(await api.get("/v1/orgs/acme/usage"), 401)


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"from": "yesterday"}, 400, ("from",)),
        ({"to": "2027-01-15T08:00:00"}, 400, ("to", "time zone")),
        ({"from": NOW, "to": NOW - 1}, 422, ("from must be before to",)),
        ({"from": NOW - 500 * 24 * HOUR, "to": NOW}, 422, ("at most",)),
        ({"group_by": "region"}, 400, ("group_by",)),
    ],
)
async def test_a_bad_window_names_its_field(
    metered: Embedded, params: dict[str, object], status: int, words: tuple[str, ...]
) -> None:
    async with metered.client(metered.operator) as api:
        response = await api.get("/v1/orgs/acme/usage", params=params)
    assert_fly_error(response, status, *words)
