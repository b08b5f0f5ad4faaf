"""``hangar proxy --backends FILE`` as its own process, in front of a real backend process."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import httpx
import pytest

from hangar.cli.main import checks_summary
from hangar.cli.proxy import parse_port_map
from hangar.proxy.standalone import listening_port, proxy_command
from tests.proxy.conftest import DOMAIN, free_port, loopback_address, start_backend


async def test_the_proxy_command_serves_a_backends_file(tmp_path: Path) -> None:
    address = loopback_address()
    backend = await start_backend("web-1", address, free_port(address))
    machines = [
        {
            "id": "web-1",
            "app": "web",
            "state": "started",
            "private_ip": address,
            "config": {
                "image": "ignored",
                "services": [
                    {
                        "protocol": "tcp",
                        "internal_port": backend.port,
                        "ports": [{"port": 80, "handlers": ["http"]}],
                        "checks": [{"type": "tcp", "grace_period": "0s"}],
                    }
                ],
            },
        }
    ]
    path = tmp_path / "backends.json"
    path.write_text(json.dumps(machines))
    process = await asyncio.create_subprocess_exec(
        *proxy_command(path, DOMAIN, "127.0.0.1", {80: 0}), stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(30):
            port = None
            while port is None:
                line = (await process.stderr.readline()).decode()
                assert line, "hangar proxy exited"
                port = listening_port(line, 80)
            async with httpx.AsyncClient(timeout=20) as http:
                url = f"http://127.0.0.1:{port}/"
                while (
                    response := await http.get(url, headers={"host": f"web.{DOMAIN}"})
                ).status_code == 503:
                    await asyncio.sleep(0.05)  # until its first tcp check has passed
                assert response.text == "web-1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
        await backend.stop()


def test_port_map_and_checks_summary() -> None:
    assert parse_port_map(["80=8080", "443=0"]) == {80: 8080, 443: 0}
    for bad in ("80", "x=1", "80=70000"):
        with pytest.raises(ValueError):
            parse_port_map([bad])
    assert checks_summary([]) == ""
    assert (
        checks_summary([{"name": "a", "status": "passing"}, {"name": "b", "status": "critical"}])
        == "1/2 passing; b failing"
    )
