"""The gateway on a socket of its own: a uvicorn server on the event loop of the process that
runs it (``hangar server``'s proxy side), started and stopped with it."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from hangar.llm.gateway import Gateway

START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 30.0


class GatewayListener:
    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The base URL an OpenAI client is given (``.../v1``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP named, and TCP_NODELAY on the listener (its connections inherit it):
        # an answer goes out as headers then body, and with Nagle's algorithm the body would
        # wait for the client's delayed ACK of the headers (40 ms a request).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        # No log settings of its own: uvicorn would set its loggers' levels for the whole
        # process, silencing the API server's lines.
        config = uvicorn.Config(
            self.gateway.app, lifespan="on", log_config=None, log_level=None, access_log=False
        )
        server = self._server = uvicorn.Server(config)
        task = self._task = asyncio.create_task(server.serve(sockets=[sock]))
        loop = asyncio.get_running_loop()
        give_up = loop.time() + START_DEADLINE_S
        while not server.started and not task.done():
            if loop.time() > give_up:
                raise TimeoutError("the model gateway did not start listening")
            await asyncio.sleep(0.01)
        if task.done():
            task.result()

    async def close(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, STOP_DEADLINE_S)
            except TimeoutError:
                self._task.cancel()
        if self._socket is not None:
            self._socket.close()
