"""Shared parts of the model-serving tests: the real engine (built once, cached in the suite's
``HANGAR_CACHE``), the tiny model, one shared ``llama-server`` on loopback, and the gateway
served by a real uvicorn on loopback for the official ``openai`` client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import uvicorn

from hangar.clock import ManualClock
from hangar.llm.engine import EngineBinary, ensure_llama_server
from hangar.llm.gateway import Gateway
from hangar.llm.native import EngineArgs, EngineProcess
from hangar.llm.tinymodel import write_tiny_model
from hangar.settings import Settings
from tests.conftest import SUITE_CACHE

SERVE_DEADLINE_S = 30.0
T = TypeVar("T")


@pytest.fixture(scope="session")
def engine_binary() -> EngineBinary:
    """llama-server, built once into the shared cache (minutes the first time), or the binary
    ``HANGAR_LLAMA_SERVER`` names."""
    return ensure_llama_server(SUITE_CACHE, configured=Settings().llama_server)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def shared_engine(
    engine_binary: EngineBinary, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineProcess]:
    """One running llama-server over the tiny model, for tests that do not stop it."""
    args = EngineArgs(model=tiny_model, alias="tiny", parallel=4, context=2048)
    engine = EngineProcess(
        engine_binary.path, args, tmp_path_factory.mktemp("engine") / "server.log"
    )
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@contextlib.asynccontextmanager
async def serving(gateway: Gateway) -> AsyncIterator[str]:
    """The gateway under a real uvicorn on a loopback port of its own; yields its /v1 URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(gateway.app, lifespan="on", log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        await until(lambda: server.started or task.done(), "uvicorn to start")
        if task.done():
            task.result()
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, SERVE_DEADLINE_S)
        listener.close()


async def until(
    condition: Callable[[], bool], what: str, deadline_s: float = SERVE_DEADLINE_S
) -> None:
    """Poll ``condition`` (yielding to the loop) until it holds; fail after ``deadline_s``."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def pumping(clock: ManualClock, work: Awaitable[T], step_s: float = 0.05) -> T:
    """Await ``work`` while moving the manual clock on, so that what it waits for on the
    clock (health polls) comes round; bounded by real time."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + SERVE_DEADLINE_S
    while not task.done():
        if loop.time() > give_up:
            task.cancel()
            raise AssertionError("timed out pumping the clock")
        clock.advance(step_s)
        await asyncio.sleep(0.01)
    return task.result()
