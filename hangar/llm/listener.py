"""The gateway on a socket of its own: a server on the event loop of the process that runs it
(``hangar server``'s proxy side), started and stopped with it, with the same connection
limits as the API (:mod:`hangar.http_server`)."""

from __future__ import annotations

from hangar.http_server import ConnectionLimits, Listener
from hangar.llm.gateway import Gateway


class GatewayListener(Listener):
    def __init__(self, gateway: Gateway, host: str, port: int, limits: ConnectionLimits) -> None:
        super().__init__(gateway.app, host, port, limits, name="model gateway")
        self.gateway = gateway

    @property
    def url(self) -> str:
        """The base URL an OpenAI client is given (``.../v1``)."""
        return f"{super().url}/v1"
