"""The dashboard's sign-in and what each token sees, against a server built in this process:
the cookie's attributes, the ``?token=`` link, refusals, and that a page, a fragment, the
usage data or the event stream never shows another org's machines."""

from __future__ import annotations

from pathlib import Path

import pytest

from hangar.clock import ManualClock
from hangar.model.config import MachineConfig
from hangar.model.machine import Machine, MachineState, host_event
from hangar.model.usage import UsageInterval, UsageSubject
from hangar.web.app import COOKIE
from hangar.web.events import MAX_STREAMS, EventStreams
from tests.fixtures.embedded import Embedded, embedded

NOW = 1_800_000_000.0


def add_machine(server: Embedded, machine_id: str, app: str, state: MachineState) -> None:
    config = MachineConfig.model_validate({"image": f"registry.example/{app}:v1"})
    server.server.stores.machines.insert_machine(
        Machine(
            id=machine_id,
            name=f"{app}-{machine_id[:4]}",
            app=app,
            state=state,
            region="local",
            instance_id="i1",
            version=1,
            config=config,
            created_at=NOW - 60,
            updated_at=NOW - 60,
        )
    )
    server.server.stores.machines.add_event(machine_id, host_event("start", str(state), NOW - 5))


@pytest.fixture
def fleet(tmp_path: Path) -> Embedded:
    server = embedded(tmp_path, ManualClock(NOW))
    server.org_with_app("acme", "acme-web")
    server.org_with_app("acme", "acme-jobs")
    server.org_with_app("globex", "globex-shop")
    add_machine(server, "aaaa00000000a1", "acme-web", MachineState.STARTED)
    add_machine(server, "aaaa00000000a2", "acme-jobs", MachineState.STOPPED)
    add_machine(server, "bbbb00000000b1", "globex-shop", MachineState.STARTED)
    for org, app, machine_id in [
        ("acme", "acme-web", "aaaa00000000a1"),
        ("globex", "globex-shop", "bbbb00000000b1"),
    ]:
        server.server.stores.usage.open_interval(
            UsageInterval(
                id=f"{machine_id}.1.1",
                subject=UsageSubject.MACHINE,
                org=org,
                app=app,
                machine_id=machine_id,
                host="h",
                region="local",
                cpu_kind="shared",
                cpus=1,
                memory_mb=256,
                started_at=NOW - 1800,
                until=NOW - 60,
            )
        )
    return server


async def signed_in_page(server: Embedded, secret: str) -> str:
    async with server.client() as browser:
        link = await browser.get("/ui/", params={"token": secret})
        assert link.status_code == 200, link.text
        page = await browser.get("/ui/")
        assert page.status_code == 200, page.text
        return page.text


async def test_the_login_form_sets_a_strict_http_only_cookie(fleet: Embedded) -> None:
    async with fleet.client() as browser:
        form = await browser.get("/ui/login")
        assert form.status_code == 200 and 'name="token"' in form.text
        cross_site = await browser.post(
            "/ui/login", data={"token": fleet.operator}, headers={"origin": "http://elsewhere"}
        )
        assert cross_site.status_code == 403 and "set-cookie" not in cross_site.headers
        refused = await browser.post("/ui/login", data={"token": "hgr_" + "x" * 43})
        assert refused.status_code == 401 and "error" in refused.text
        assert COOKIE not in refused.headers.get("set-cookie", "")
        accepted = await browser.post(
            "/ui/login", data={"token": fleet.operator}, headers={"origin": "http://hangar"}
        )
        assert accepted.status_code == 200
        cookie = accepted.headers["set-cookie"]
        for attribute in ("HttpOnly", "SameSite=strict", "Path=/ui"):
            assert attribute.lower() in cookie.lower(), cookie
        assert fleet.operator not in accepted.text
        assert accepted.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in accepted.headers["content-security-policy"]
        dashboard = await browser.get("/ui/")
        assert dashboard.status_code == 200 and 'data-testid="viewer">operator<' in dashboard.text
        out = await browser.post("/ui/logout")
        assert out.status_code == 303
        assert (await browser.get("/ui/")).headers["location"] == "/ui/login"


async def test_without_a_valid_token_pages_go_to_login_and_data_is_refused(
    fleet: Embedded,
) -> None:
    async with fleet.client() as browser:
        page = await browser.get("/ui/")
        assert (page.status_code, page.headers["location"]) == (303, "/ui/login")
        for path in ("/ui/partials/machines", "/ui/usage.json", "/ui/events"):
            assert (await browser.get(path)).status_code == 401, path
        bad_link = await browser.get("/ui/", params={"token": "nope"})
        assert bad_link.status_code == 401 and "error" in bad_link.text
    secret = fleet.token("acme")
    async with fleet.client() as browser:
        await browser.get("/ui/", params={"token": secret})
        assert (await browser.get("/ui/")).status_code == 200
        token = fleet.server.tokens.authenticate(secret)
        fleet.server.tokens.revoke(token.id)
        assert (await browser.get("/ui/")).headers["location"] == "/ui/login"


async def test_an_org_token_sees_its_org_only(fleet: Embedded) -> None:
    page = await signed_in_page(fleet, fleet.token("acme"))
    assert "aaaa00000000a1" in page and "aaaa00000000a2" in page
    assert "bbbb00000000b1" not in page and "globex" not in page
    assert 'data-testid="gpus"' not in page and 'data-testid="hosts"' not in page
    assert 'data-testid="placement"' in page and 'id="usage"' in page
    operator = await signed_in_page(fleet, fleet.operator)
    assert "bbbb00000000b1" in operator and 'data-testid="gpus"' in operator


async def test_an_app_token_sees_its_app_and_no_org_data(fleet: Embedded) -> None:
    secret = fleet.token("acme", app="acme-jobs", read_only=True)
    page = await signed_in_page(fleet, secret)
    assert "aaaa00000000a2" in page
    assert "aaaa00000000a1" not in page and "bbbb00000000b1" not in page
    assert 'id="usage"' not in page and 'data-testid="placement"' not in page
    async with fleet.client() as browser:
        await browser.get("/ui/", params={"token": secret})
        assert (await browser.get("/ui/usage.json")).status_code == 403
        fragment = await browser.get("/ui/partials/machines")
    assert "aaaa00000000a2" in fragment.text and "aaaa00000000a1" not in fragment.text


async def test_usage_data_is_the_viewers_org(fleet: Embedded) -> None:
    async with fleet.client() as browser:
        await browser.get("/ui/", params={"token": fleet.token("acme")})
        acme = (await browser.get("/ui/usage.json", params={"window": "1h"})).json()
    assert set(acme["machine_hours"]) == {"acme"}
    assert sum(acme["machine_hours"]["acme"]) == pytest.approx((1800 - 60) / 3600)
    assert len(acme["x"]) == 60
    async with fleet.client() as browser:
        await browser.get("/ui/", params={"token": fleet.operator})
        everyone = (await browser.get("/ui/usage.json", params={"window": "24h"})).json()
    assert set(everyone["machine_hours"]) == {"acme", "globex"}


async def test_the_event_stream_carries_only_visible_machines_and_is_bounded(
    fleet: Embedded,
) -> None:
    web = fleet.server.web.state
    streams: EventStreams = web.streams
    acme = fleet.token("acme")
    stream = streams.stream(lambda: web.viewers.viewer(acme), int((NOW - 3600) * 1000))
    chunks = [await anext(stream) for _ in range(3)]
    assert streams.active == 1
    await stream.aclose()
    assert streams.active == 0
    text = b"".join(chunks).decode()
    assert text.startswith("retry:")
    assert "aaaa00000000a1" in text and "aaaa00000000a2" in text and "bbbb" not in text
    streams.active = MAX_STREAMS
    async with fleet.client() as browser:
        await browser.get("/ui/", params={"token": acme})
        refused = await browser.get("/ui/events")
    assert refused.status_code == 429 and "too many live event streams" in refused.text
    assert refused.headers["retry-after"] == "5"
