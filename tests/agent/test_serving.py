"""Machines that serve, end to end through the API of a real server (in this process): real
guests on the host's private network, the internal DNS, and the proxy from the host.

One org runs two busybox ``httpd`` machines behind a service and a client machine that
fetches from them by name; a second org's machine tries to reach them by name and address.
From the host, the proxy routes by ``Host`` and balances over the two, a stopped app is woken
by a request, an idle machine is stopped down to ``min_machines_running``, and a machine whose
check fails is taken out of rotation.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.agent.helpers import console_text, machine_path, wait_state
from tests.conftest import RUNSC, kill_vmms_under
from tests.fixtures.inprocess import InProcessServer

pytestmark = pytest.mark.slow

SERVE = (
    'mkdir -p /www && echo "hello from $HOSTNAME" > /www/index.html && '
    "exec httpd -f -p 8080 -h /www"
)
# Serves for a while, then stops answering: its check turns critical.
SERVE_BRIEFLY = (
    'mkdir -p /www && echo "short-lived $HOSTNAME" > /www/index.html && '
    "httpd -p 8080 -h /www && sleep 25 && killall httpd && sleep 3600"
)
SERVICE = {
    "protocol": "tcp",
    "internal_port": 8080,
    "ports": [{"port": 80, "handlers": ["http"]}],
    "autostart": True,
    "autostop": "off",
    "checks": [{"type": "http", "interval": "1s", "timeout": "2s", "path": "/"}],
}
SLEEPY_SERVICE = {**SERVICE, "autostop": "stop", "min_machines_running": 1}
PROBE_GUARD_S = 240.0


def probe_script(target: str) -> str:
    """A client's loop: resolve and fetch the web app by name, and its address, printing
    markers the test reads on the console."""
    return (
        "while true; do "
        "echo \"dns:$(nslookup web.internal 2>&1 | tr '\\n' ' ')\"; "
        f'echo "fetch:$(timeout 5 wget -q -O - http://web.internal:8080/ 2>&1)"; '
        f'echo "direct:$(timeout 5 wget -q -O - http://[{target}]:8080/ 2>&1)"; '
        'echo "host:$(timeout 5 wget -q -O - http://[$HOST_DNS]:$HOST_PORT/ 2>&1)"; '
        "sleep 2; done"
    )


@dataclass
class World:
    server: InProcessServer
    api: httpx.Client
    web: list[str]
    host_port: int
    """An HTTP server of the host's (on every address) that guests must not reach."""

    def proxy_get(self, host: str = "web.localhost", timeout_s: float = 90.0) -> httpx.Response:
        proxy = self.server.embedded.traffic.proxy
        assert proxy is not None
        port = proxy.host_port(80)
        return httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": host}, timeout=timeout_s)


def create(api: httpx.Client, app: str, cmd: str, **config: Any) -> str:
    body = {
        "image": config.pop("image"),
        "init": {"cmd": ["sh", "-c", cmd]},
        "restart": {"policy": "no"},
        **config,
    }
    response = api.post(machine_path(app), json={"config": body})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def until(check: Any, what: str, timeout_s: float = PROBE_GUARD_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"never: {what}")


class HostSecret(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host-secret")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class DualStackServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, test_image: str) -> Iterator[World]:
    home = tmp_path_factory.mktemp("serving")
    listener = DualStackServer(("::", 0), HostSecret)
    threading.Thread(target=listener.serve_forever, daemon=True).start()
    try:
        with (
            InProcessServer(
                home, proxy_port_map={80: 0}, proxy_idle_stop_s=8.0, runsc=RUNSC
            ) as server,
            server.client() as api,
        ):
            orgs = {
                "acme": ["web", "client", "sleepy", "dozyvm", "dozysandbox", "sandweb"],
                "rival": ["intruder"],
            }
            for org, apps in orgs.items():
                assert api.post("/v1/orgs", json={"slug": org}).status_code == 201
                for app in apps:
                    response = api.post("/v1/apps", json={"app_name": app, "org_slug": org})
                    assert response.status_code == 201, response.text
            web = [
                create(api, "web", SERVE, image=test_image, services=[SERVICE]) for _ in range(2)
            ]
            for machine_id in web:
                wait_state(api, "web", machine_id, "started")
            yield World(server, api, web, listener.server_address[1])
    finally:
        listener.shutdown()
        listener.server_close()
        kill_vmms_under(home)


def machine(world: World, app: str, machine_id: str) -> dict[str, Any]:
    body: dict[str, Any] = world.api.get(machine_path(app, machine_id)).json()
    return body


def test_machines_have_private_addresses_and_pass_their_checks(world: World) -> None:
    addresses = {machine(world, "web", m)["private_ip"] for m in world.web}
    assert len(addresses) == 2 and all(a.startswith("fd") for a in addresses)
    for machine_id in world.web:
        until(
            lambda machine_id=machine_id: [
                c for c in machine(world, "web", machine_id)["checks"] if c["status"] == "passing"
            ],
            f"{machine_id}'s check passes",
        )


def test_same_org_reaches_by_name_other_org_cannot_and_nobody_reaches_the_host(
    world: World, test_image: str
) -> None:
    target = machine(world, "web", world.web[0])["private_ip"]
    network = world.server.embedded.agent.host.network
    assert network is not None
    env = {"HOST_DNS": str(network.net.plan.dns_address), "HOST_PORT": str(world.host_port)}
    client = create(world.api, "client", probe_script(target), image=test_image, env=env)
    intruder = create(world.api, "intruder", probe_script(target), image=test_image, env=env)
    for app, machine_id in (("client", client), ("intruder", intruder)):
        wait_state(world.api, app, machine_id, "started")

    def lines(app: str, machine_id: str, prefix: str) -> list[str]:
        text = console_text(world.api, app, machine_id)
        return [line for line in text.splitlines() if line.startswith(prefix)]

    fetched = until(
        lambda: [line for line in lines("client", client, "fetch:") if "hello from" in line],
        "the client fetches from web.internal",
    )
    assert any(web_id in fetched[0] for web_id in world.web)
    assert until(lambda: [x for x in lines("client", client, "direct:") if "hello" in x], "direct")
    web_addresses = {machine(world, "web", m)["private_ip"] for m in world.web}
    client_dns = until(lambda: lines("client", client, "dns:"), "the client resolves")
    assert any(address in " ".join(client_dns) for address in web_addresses)

    intruder_dns = until(lambda: lines("intruder", intruder, "dns:"), "the intruder asks")
    assert all(address not in " ".join(intruder_dns) for address in web_addresses)
    assert until(lambda: len(lines("intruder", intruder, "direct:")) >= 2, "the intruder tries")
    assert all("hello" not in line for line in lines("intruder", intruder, "fetch:"))
    assert all("hello" not in line for line in lines("intruder", intruder, "direct:"))
    # The host's own listener answers nobody on the private network, of either org.
    host_lines = lines("client", client, "host:") + lines("intruder", intruder, "host:")
    assert host_lines and not any("host-secret" in line for line in host_lines)
    with httpx.Client() as local:
        assert local.get(f"http://127.0.0.1:{world.host_port}/").text == "host-secret"
    for app, machine_id in (("client", client), ("intruder", intruder)):
        response = world.api.delete(machine_path(app, machine_id), params={"force": "true"})
        assert response.status_code == 200


def test_the_proxy_routes_by_host_and_balances(world: World) -> None:
    served = {world.proxy_get().text.strip() for _ in range(8)}
    assert served == {f"hello from {machine_id}" for machine_id in world.web}
    assert world.proxy_get(host="nothing.localhost").status_code == 404


def test_a_sandbox_machine_serves_through_the_proxy_and_passes_its_check(
    world: World, test_image: str
) -> None:
    """The sandbox tier is on the private network as VMs are: the health check reaches the
    machine's address and the proxy forwards to it."""
    machine_id = create(
        world.api, "sandweb", SERVE, image=test_image, services=[SERVICE], guest={"tier": "sandbox"}
    )
    try:
        wait_state(world.api, "sandweb", machine_id, "started")
        assert machine(world, "sandweb", machine_id)["config"]["guest"]["tier"] == "sandbox"
        until(
            lambda: [
                c
                for c in machine(world, "sandweb", machine_id)["checks"]
                if c["status"] == "passing"
            ],
            "the sandbox machine's check passes",
        )
        served = until(
            lambda: (r := world.proxy_get(host="sandweb.localhost")).status_code == 200 and r.text,
            "the proxy serves the sandbox machine",
        )
        assert served.startswith("hello from")
    finally:
        world.api.delete(machine_path("sandweb", machine_id), params={"force": "true"})


def test_idle_machines_stop_down_to_min_machines_running_and_a_request_wakes_one(
    world: World, test_image: str
) -> None:
    sleepy = [
        create(world.api, "sleepy", SERVE, image=test_image, services=[SLEEPY_SERVICE])
        for _ in range(2)
    ]

    def states() -> list[str]:
        return sorted(machine(world, "sleepy", m)["state"] for m in sleepy)

    until(lambda: states() == ["started", "stopped"], "one idle machine stops, one stays")
    for machine_id in sleepy:
        if machine(world, "sleepy", machine_id)["state"] == "started":
            stopped = world.api.post(machine_path("sleepy", machine_id) + "/stop")
            assert stopped.status_code == 200
            wait_state(world.api, "sleepy", machine_id, "stopped")
    woken = world.proxy_get("sleepy.localhost", timeout_s=180.0)
    assert woken.status_code == 200 and woken.text.startswith("hello from")
    assert "started" in states()


@pytest.mark.parametrize("tier", ["vm", "sandbox"])
def test_an_idle_machine_that_autostops_by_suspending_is_resumed_by_a_request(
    world: World, test_image: str, tier: str
) -> None:
    """In both tiers: a sandbox is checkpointed (gVisor) and restored on a fresh namespace
    with its address, and serves on."""
    service = {**SERVICE, "autostop": "suspend"}
    app = f"dozy{tier}"
    dozy = create(world.api, app, SERVE, image=test_image, services=[service], guest={"tier": tier})
    until(lambda: machine(world, app, dozy)["state"] == "suspended", "the idle one suspends")
    woken = world.proxy_get(f"{app}.localhost", timeout_s=180.0)
    assert woken.status_code == 200 and woken.text == f"hello from {dozy}\n"
    events = world.api.get(machine_path(app, dozy) + "/events").json()
    assert any(e["type"] == "resume" and e["status"] == "resumed" for e in events)
    assert world.api.delete(machine_path(app, dozy), params={"force": "true"}).status_code == 200


def test_a_failing_check_takes_a_machine_out_of_rotation(world: World, test_image: str) -> None:
    brief = create(world.api, "web", SERVE_BRIEFLY, image=test_image, services=[SERVICE])
    wait_state(world.api, "web", brief, "started")
    until(
        lambda: [c for c in machine(world, "web", brief)["checks"] if c["status"] == "critical"],
        "its check fails once it stops serving",
    )
    for _ in range(6):
        assert "short-lived" not in world.proxy_get().text
    assert world.api.delete(machine_path("web", brief), params={"force": "true"}).status_code == 200
