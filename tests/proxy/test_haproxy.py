"""The prepared HAProxy data path: a rendered configuration run by Debian's HAProxy in front of
real backends, steered through its runtime API."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hangar.proxy.haproxy import HaproxyRuntime, render_haproxy
from hangar.proxy.routes import plan_routes
from hangar.proxy.settings import ProxySettings
from tests.proxy.conftest import (
    DOMAIN,
    ProcessBackends,
    eventually,
    free_port,
    loopback_address,
    machine,
    service,
    start_backend,
)

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")


@contextlib.contextmanager
def haproxy(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(10)


async def test_a_rendered_haproxy_routes_by_host_and_is_steered_at_runtime(
    backends: ProcessBackends, tmp_path: Path
) -> None:
    address = loopback_address()
    port = free_port(address)
    limits: dict[str, object] = {
        "concurrency": {"type": "connections", "soft_limit": 5, "hard_limit": 10}
    }
    items = [
        machine("web-1", "web", address, [service(80, port, None, **limits)]),
        machine("web-2", "web", loopback_address(), [service(80, port, None, **limits)]),
        machine("api-1", "api", loopback_address(), [service(80, port)]),
        machine("nap-1", "nap", loopback_address(), [service(80, port)], state="stopped"),
    ]
    for item in items[:3]:
        await backends.launch(item)
    waker = await start_backend("hangar-wake", "127.0.0.1", 0)
    try:
        plan = plan_routes(items)
        runtime_socket = tmp_path / "haproxy.sock"
        listen = free_port("127.0.0.1")
        text = render_haproxy(
            plan,
            ProxySettings(domain=DOMAIN, bind_host="127.0.0.1"),
            ready={"web-1", "api-1"},
            runtime_socket=runtime_socket,
            host_ports={80: listen},
            wake=("127.0.0.1", waker.port),
        )
        assert f"server web-1 {address}:{port} maxconn 10" in text
        config = tmp_path / "haproxy.cfg"
        config.write_text(text)
        with haproxy(config) as process:
            await eventually(lambda: runtime_socket.exists() or process.poll() is not None)
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{listen}", timeout=20) as http:

                async def ask(app: str) -> str:
                    return (await http.get("/", headers={"host": f"{app}.{DOMAIN}"})).text

                assert {await ask("web") for _ in range(4)} == {"web-1"}  # web-2 not ready
                assert await ask("api") == "api-1"
                assert await ask("nap") == "hangar-wake"  # nothing up: hangar wakes one
                missing = await http.get("/", headers={"host": f"nope.{DOMAIN}"})
                assert missing.status_code == 404
                seen = (await http.get("/headers", headers={"host": f"web.{DOMAIN}"})).json()
                assert seen["fly-client-ip"] == "127.0.0.1"
                runtime = HaproxyRuntime(runtime_socket)
                route = plan.ports[80].routes["web"]
                await asyncio.to_thread(runtime.set_ready, route, "web-2", True)
                assert {await ask("web") for _ in range(6)} == {"web-1", "web-2"}
                stats = {s.server: s for s in await asyncio.to_thread(runtime.server_stats)}
                assert stats["web-1"].total_sessions >= 1
                assert stats["web-2"].status == "no check"  # in rotation; hangar runs checks
    finally:
        await waker.stop()
