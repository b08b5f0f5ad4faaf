"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, against a
real ``hangar server`` on a fixture GPU host (an HGX board's sysfs tree) with real machines.

It checks what a person would see: a machine started through the API appears while the page
is open; a quarantined GPU shows as quarantined, with why; an org token does not see another
org's machines (nor the hosts and GPUs). Screenshots are saved in the test's output folder.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from hangar.agent.placement import HostPlacement
from hangar.model.gpu import GpuState
from hangar.model.host import read_local_host
from hangar.server_process import ServerProcess
from hangar.settings import DATABASE, env_name
from hangar.store.embedded import open_embedded_stores
from tests.agent.helpers import machine_path, run_machine, wait_state
from tests.conftest import running_server
from tests.devices.sysfs_fixture import build_hgx_h100

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]
QUARANTINE_REASON = "handoff: memory clear read back non-zero bytes"
SEEN_MS = 60_000
VIEWPORT = {"width": 1400, "height": 1000}
expect.set_options(timeout=SEEN_MS)


@dataclass
class Fleet:
    server: ServerProcess
    acme_token: str
    globex_machine: str
    quarantined: str
    image: str


def quarantine_one_gpu(home: Path) -> str:
    """What a failed handoff leaves (the agent's QuarantineGpu step): the reason on the GPU's
    record, and the GPU quarantined on the host's claim record."""
    stores = open_embedded_stores(home / DATABASE)
    try:
        placement = HostPlacement(stores.claims, read_local_host(socket.gethostname(), "local"))
        bdf = placement.gpus()[3].bdf
        record = stores.gpus.get_gpu(bdf)
        assert record is not None
        stores.gpus.save_gpu(record.model_copy(update={"quarantine_reason": QUARANTINE_REASON}))
        assert placement.set_gpu_state(bdf, GpuState.QUARANTINED, GpuState.FREE)
        return bdf
    finally:
        stores.close()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, registry: str, registry_image: str
) -> Iterator[Fleet]:
    """The server, with a machine of org globex started, and one GPU quarantined. Machines
    run the test image from the loopback registry (the page shows that reference)."""
    root = tmp_path_factory.mktemp("dashboard")
    build_hgx_h100(root / "sys")
    env = {
        env_name("insecure_registries"): registry,
        env_name("local_registries"): registry,
        env_name("sysfs_root"): str(root / "sys"),
        env_name("nvml"): "0",
        env_name("usage_checkpoint_s"): "1",
    }
    with running_server(root / "home", env=env) as server:
        with server.client() as api:
            for org in ("acme", "globex"):
                assert api.post("/v1/orgs", json={"slug": org}).status_code == 201
                created = api.post("/v1/apps", json={"app_name": f"{org}-web", "org_slug": org})
                assert created.status_code == 201, created.text
            globex_machine = run_machine(api, "globex-web", registry_image, cmd=SLEEPER)
            wait_state(api, "globex-web", globex_machine, "started")
            acme_token = api.post("/v1/tokens", json={"org_slug": "acme"}).json()["token"]
        quarantined = quarantine_one_gpu(server.home)
        yield Fleet(server, acme_token, globex_machine, quarantined, registry_image)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser: Browser) -> Page:
    page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
    page.set_default_timeout(SEEN_MS)
    return page


def test_the_operator_sees_gpus_and_a_machine_started_through_the_api(
    fleet: Fleet, browser: Browser, tmp_path: Path
) -> None:
    page = open_page(browser)
    page.goto(f"{fleet.server.url}/ui/?token={fleet.server.operator_token}")
    expect(page.get_by_test_id("viewer")).to_have_text("operator")
    assert "token=" not in page.url
    gpu = page.locator(f"[data-gpu='{fleet.quarantined}']")
    expect(gpu.get_by_test_id("gpu-state")).to_have_text("quarantined")
    expect(gpu).to_contain_text(QUARANTINE_REASON)
    expect(page.get_by_test_id("gpus").get_by_text("free", exact=True)).to_have_count(7)
    expect(page.get_by_test_id("placement")).to_contain_text("h100-sxm")
    expect(page.locator(f"[data-machine='{fleet.globex_machine}']").first).to_be_visible()
    expect(page.locator("#live-state")).to_have_text("live")

    with fleet.server.client() as api:
        machine_id = run_machine(api, "acme-web", fleet.image, cmd=SLEEPER)
        row = page.get_by_test_id("machines").locator(f"[data-machine='{machine_id}']")
        expect(row).to_contain_text("started")
        expect(page.get_by_test_id("events")).to_contain_text(machine_id)
        wait_state(api, "acme-web", machine_id, "started")
    expect(page.get_by_test_id("started-count")).to_have_text("2")
    expect(page.locator("#chart-orgs .uplot")).to_be_visible()
    page.screenshot(path=str(tmp_path / "dashboard-operator.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'dashboard-operator.png'}")
    log = fleet.server.log_path.read_text()
    assert fleet.server.operator_token not in log
    assert "/ui/?token=" not in log or "/ui/?token=REDACTED" in log


def test_an_org_token_sees_its_own_machines_only(
    fleet: Fleet, browser: Browser, tmp_path: Path
) -> None:
    with fleet.server.client() as api:
        acme_machine = run_machine(api, "acme-web", fleet.image, cmd=SLEEPER)
        wait_state(api, "acme-web", acme_machine, "started")
    page = open_page(browser)
    page.goto(f"{fleet.server.url}/ui/login")
    page.get_by_label("API token").fill(fleet.acme_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_test_id("viewer")).to_have_text("org acme")
    expect(
        page.get_by_test_id("machines").locator(f"[data-machine='{acme_machine}']")
    ).to_be_visible()
    expect(page.get_by_test_id("events")).to_contain_text(acme_machine)
    expect(page.get_by_test_id("gpus")).to_have_count(0)
    expect(page.get_by_test_id("hosts")).to_have_count(0)
    expect(page.get_by_test_id("placement")).to_contain_text("h100-sxm")
    page.screenshot(path=str(tmp_path / "dashboard-org.png"), full_page=True)
    content = page.content()
    assert fleet.globex_machine not in content and "globex" not in content
    # What the page's own requests can reach says the same.
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    with httpx.Client(base_url=fleet.server.url, cookies=cookies) as as_page:
        assert fleet.globex_machine not in as_page.get("/ui/partials/machines").text
        assert set(as_page.get("/ui/usage.json").json()["machine_hours"]) <= {"acme"}
    with fleet.server.client() as api:
        api.delete(machine_path("acme-web", acme_machine), params={"force": "true"})
