"""The gateway's real upstream transport with a gate: a streamed answer is held after its first
chunk until the test opens the gate. A gateway that buffered answers would deliver nothing
while the gate is shut, so this tells streaming apart from buffering without timing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx


class GatedTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.gate = asyncio.Event()
        self.held = 0  # streams now waiting at the gate
        self.streams = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return response
        self.streams += 1
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_GatedStream(response.stream, self),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class _GatedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, transport: GatedTransport) -> None:
        self._inner = inner
        self._transport = transport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        first = True
        async for chunk in self._inner:
            yield chunk
            if first:
                first = False
                self._transport.held += 1
                try:
                    await self._transport.gate.wait()
                finally:
                    self._transport.held -= 1

    async def aclose(self) -> None:
        await self._inner.aclose()
