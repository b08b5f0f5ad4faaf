"""Limits on hostile input: rate limits (Fly's defaults), request and file sizes, names,
guest paths, and ``oci:`` layouts outside the directories the operator allows."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hangar.api.guard import MAX_BODY_BYTES
from hangar.clock import ManualClock
from hangar.model.config import MAX_FILE_BYTES
from hangar.ratelimit import RateLimits
from hangar.server import bootstrap_operator_token, build_server
from hangar.settings import Settings
from tests.api.helpers import assert_fly_error


@pytest.fixture
async def fly_limited(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, ManualClock]]:
    """The server's app in this process, Fly's default limits, on a clock the test moves."""
    clock = ManualClock()
    settings = Settings(home=tmp_path)
    server = build_server(settings, clock=clock, rate_limits=RateLimits())
    secret = bootstrap_operator_token(settings.operator_token_file, server.tokens)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=server.app),
        base_url="http://hangar",
        headers={"Authorization": f"Bearer {secret}"},
    ) as client:
        assert (await client.post("/v1/apps", json={"app_name": "web"})).status_code == 201
        yield client, clock


async def test_fly_default_rate_limits_answer_429_with_retry_after(
    fly_limited: tuple[httpx.AsyncClient, ManualClock],
) -> None:
    client, clock = fly_limited
    stop = "/v1/apps/web/machines/0123456789abcd/stop"
    assert [(await client.post(stop)).status_code for _ in range(3)] == [404, 404, 404]
    limited = await client.post(stop)
    assert_fly_error(limited, 429, "stop_machine")
    assert limited.headers["retry-after"] == "1"
    assert (await client.post("/v1/apps/web/machines/0123456789abcd/start")).status_code == 404
    clock.advance(1.0)
    assert (await client.post(stop)).status_code == 404
    get = "/v1/apps/web/machines/0123456789abcd"
    assert {(await client.get(get)).status_code for _ in range(10)} == {404}
    assert_fly_error(await client.get(get), 429, "get_machine")
    records = (await client.get("/v1/audit", params={"limit": 10})).json()["records"]
    outcomes = [(record["action"], record["outcome"], record["status"]) for record in records]
    assert ("stop_machine", "rate_limited", 429) in outcomes


def test_bodies_over_the_limit_are_413_whether_declared_or_streamed(
    api: httpx.Client, app_name: str
) -> None:
    oversized = b'{"config": {"image": "' + b"x" * (MAX_BODY_BYTES + 1) + b'"}}'
    path = f"/v1/apps/{app_name}/machines"
    assert_fly_error(api.post(path, content=oversized), 413, str(MAX_BODY_BYTES))

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(oversized), 65536):
            yield oversized[start : start + 65536]

    streamed = api.post(path, content=chunks(), headers={"content-type": "application/json"})
    assert_fly_error(streamed, 413)
    assert api.get(path).json() == []


def test_file_contents_are_bounded_and_guest_paths_absolute(
    api: httpx.Client, app_name: str
) -> None:
    too_big = base64.b64encode(b"\0" * (MAX_FILE_BYTES + 1)).decode()
    path = f"/v1/apps/{app_name}/machines"

    def with_file(guest_path: str, raw_value: str) -> dict[str, Any]:
        files = [{"guest_path": guest_path, "raw_value": raw_value}]
        return {"config": {"image": "x", "files": files}}

    assert_fly_error(api.post(path, json=with_file("/etc/x", too_big)), 422, "raw_value")
    for escape in ("etc/x", "/etc/../../x", "/a/./../b"):
        assert_fly_error(api.post(path, json=with_file(escape, "")), 422, "guest_path")
    assert_fly_error(api.post(path, json=with_file("/etc/x", "not base64!")), 422, "base64")
    assert api.get(path).json() == []


def test_names_and_metadata_keys_are_validated(api: httpx.Client, app_name: str) -> None:
    path = f"/v1/apps/{app_name}/machines"
    assert_fly_error(
        api.post(path, json={"name": "Bad Name", "config": {"image": "x"}}), 422, "name"
    )
    bad_key = {"config": {"image": "x", "metadata": {"bad key": "v"}}}
    assert_fly_error(api.post(path, json=bad_key), 422, "metadata")
    assert_fly_error(api.post("/v1/orgs", json={"slug": "../etc"}), 422, "slug")
    assert_fly_error(api.post("/v1/apps", json={"app_name": "x" * 64}), 422, "app_name")


def test_oci_layouts_only_under_allowed_directories(
    api: httpx.Client, app_name: str, test_image: str, oci_layout: Path, tmp_path: Path
) -> None:
    path = f"/v1/apps/{app_name}/machines"

    def create(image: str) -> httpx.Response:
        return api.post(path, json={"config": {"image": image}, "skip_launch": True})

    assert create(test_image).status_code == 200
    assert_fly_error(create("oci:/etc/ssl:latest"), 422, "config.image", "HANGAR_OCI_DIRS")
    assert_fly_error(create("oci:relative/layout:test"), 422, "config.image", "absolute")
    escape = tmp_path / "escape"
    escape.symlink_to("/usr/share")
    assert_fly_error(create(f"oci:{escape}:latest"), 422, "config.image")
    through_dots = f"oci:{oci_layout}/../../../../../../etc:latest"
    assert_fly_error(create(through_dots), 422, "config.image")
    assert_fly_error(create("docker://UPPER/Case"), 422, "config.image")
    assert len(api.get(path).json()) == 1


def test_update_checks_the_image_too(api: httpx.Client, app_name: str, test_image: str) -> None:
    created = api.post(
        f"/v1/apps/{app_name}/machines", json={"config": {"image": test_image}, "skip_launch": True}
    )
    machine = f"/v1/apps/{app_name}/machines/{created.json()['id']}"
    update = {"config": {"image": "oci:/root:latest"}, "skip_launch": True}
    assert_fly_error(api.post(machine, json=update), 422, "config.image")
    assert api.get(machine).json()["config"]["image"] == test_image


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"timeout": 1' + b"0" * 400 + b"}", "timeout"),
        (b'{"timeout": {"Duration": 1' + b"0" * 30 + b"}}", "timeout.Duration"),
        (b'{"timeout": NaN}', "timeout"),
        (b'{"signal": "\\ud800"}', "signal"),
    ],
)
def test_numbers_and_text_no_field_could_mean_are_422_not_500(
    api: httpx.Client, app_name: str, test_image: str, body: bytes, field: str
) -> None:
    """Found by fuzzing: these reached validators and the store as OverflowError or
    unencodable text."""
    created = api.post(
        f"/v1/apps/{app_name}/machines", json={"config": {"image": test_image}, "skip_launch": True}
    )
    stop = f"/v1/apps/{app_name}/machines/{created.json()['id']}/stop"
    response = api.post(stop, content=body, headers={"content-type": "application/json"})
    assert_fly_error(response, 422, field)
    env = b'{"config": {"image": "x", "env": {"A": "\\udc00"}}}'
    response = api.post(
        f"/v1/apps/{app_name}/machines", content=env, headers={"content-type": "application/json"}
    )
    assert_fly_error(response, 422, "config.env.A")
