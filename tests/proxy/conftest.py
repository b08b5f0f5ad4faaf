"""Real backends for the proxy tests: HTTP server processes on their own loopback addresses
(or in a network namespace), and a ``Backends`` that really starts and stops them."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hangar.model.services import MachineChecks, MachineService
from hangar.proxy.backends import BackendMachine
from hangar.proxy.command_backends import CommandBackends, end_process

BACKEND_SCRIPT = Path(__file__).with_name("backend.py")
READY_TIMEOUT_S = 20.0
DOMAIN = "hangar.test"


def loopback_address() -> str:
    """A random address in 127/8 (all of it is loopback on Linux), so machines can share a
    port number as machines do, without meeting other tests' servers."""
    return f"127.{secrets.randbelow(250) + 2}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclasses.dataclass
class BackendProcess:
    name: str
    host: str
    port: int
    process: subprocess.Popen[bytes]

    async def stop(self) -> None:
        await end_process(self.process)


async def start_backend(
    name: str, host: str, port: int, prefix: list[str] | None = None
) -> BackendProcess:
    argv = [*(prefix or []), sys.executable, str(BACKEND_SCRIPT), host, str(port), name]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            line = (await asyncio.to_thread(process.stdout.readline)).decode()
    except TimeoutError:
        process.kill()
        process.wait()
        raise
    if not line.startswith("ready"):
        process.kill()
        process.wait()
        raise RuntimeError(f"backend {name} did not start: {line!r}")
    return BackendProcess(name, host, int(line.split()[1]), process)


def service(
    port: int, internal_port: int, handlers: list[str] | None = None, **extra: Any
) -> MachineService:
    return MachineService.model_validate(
        {
            "protocol": extra.pop("protocol", "tcp"),
            "internal_port": internal_port,
            "ports": [{"port": port, "handlers": ["http"] if handlers is None else handlers}],
            **extra,
        }
    )


def machine(
    machine_id: str,
    app: str,
    host: str,
    services: list[MachineService],
    state: str = "started",
    checks: dict[str, Any] | None = None,
) -> BackendMachine:
    from pydantic import TypeAdapter

    return BackendMachine(
        id=machine_id,
        app=app,
        state=state,
        private_ip=host,
        services=tuple(services),
        machine_checks=TypeAdapter(MachineChecks).validate_python(checks or {}),
    )


class ProcessBackends(CommandBackends):
    """Backend processes as machines: ``start`` runs ``backend.py`` for the machine (through
    ``CommandBackends``); ``launch`` starts one now and waits until it listens."""

    def put(self, *machines: BackendMachine) -> None:
        for item in machines:
            self.commands[item.id] = [
                sys.executable,
                str(BACKEND_SCRIPT),
                item.private_ip,
                str(item.services[0].internal_port),
                item.id,
            ]
        super().put(*machines)

    async def launch(self, machine: BackendMachine) -> BackendProcess:
        port = machine.services[0].internal_port
        backend = await start_backend(machine.id, machine.private_ip, port)
        self.processes[machine.id] = backend.process
        return backend


@pytest.fixture
async def backends() -> AsyncIterator[ProcessBackends]:
    backends = ProcessBackends()
    try:
        yield backends
    finally:
        await backends.close()


async def eventually(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll ``condition`` until true, letting the loop run; bounded."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
def netns() -> Iterator[Any]:
    import os

    from hangar.bench.netns import veth_namespace

    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    with veth_namespace() as link:
        yield link


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every proxy test runs on asyncio's loop and on uvloop (what ``hangar proxy`` runs on)."""
    import uvloop

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
