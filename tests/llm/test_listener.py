"""The gateway on a socket of its own, as ``hangar server`` runs it (the API's listener, with
connection limits): it answers on the port the kernel gave it, its connections send without
Nagle's delay, and it stops cleanly."""

from __future__ import annotations

import socket

import httpx

from hangar.http_server import ConnectionLimits
from hangar.llm.gateway import Gateway, GatewayConfig
from hangar.llm.listener import GatewayListener
from tests.llm.seams_impl import DeploymentList, TokenTable, UsageLog


class NoReplicas:
    async def list(self, deployment: object) -> list[object]:
        return []


async def test_the_listener_serves_and_stops() -> None:
    gateway = Gateway(
        TokenTable({}),
        DeploymentList(),
        NoReplicas(),  # type: ignore[arg-type]
        UsageLog(),
        config=GatewayConfig(reconcile_interval_s=0),
    )
    listener = GatewayListener(gateway, "127.0.0.1", 0, ConnectionLimits())
    await listener.start()
    try:
        assert listener.port != 0 and listener.url == f"http://127.0.0.1:{listener.port}/v1"
        assert listener._socket is not None
        nodelay = listener._socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert nodelay, "accepted connections inherit TCP_NODELAY from the listener"
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{listener.url}/models")
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    finally:
        await listener.close()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", listener.port)) != 0, "nothing listens after close"
