"""Health checks run by the host against machines' private addresses, on the injected clock.

Every started machine with an address gets its ``config.checks`` and ``services[].checks`` run:
first after the check's grace period, then every interval, each attempt bounded by its timeout.
A tcp check passes when the port accepts; an http check when the answer is 2xx or 3xx. Results
are Fly-shaped ``CheckStatus`` records handed to a sink (the store, or the proxy's backends),
all of one machine's at once; a machine that stops has its results cleared. At most
``max_concurrent`` checks run at once on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import Callable, Sequence
from typing import Literal

from hangar.clock import Clock
from hangar.model.services import CheckStatus, MachineCheck, service_check_name
from hangar.proxy.backends import STARTED, BackendMachine

MAX_OUTPUT = 256
MAX_RESPONSE_HEAD = 16 * 1024
CheckSink = Callable[[BackendMachine, tuple[CheckStatus, ...]], None]


def machine_checks(machine: BackendMachine) -> dict[str, tuple[MachineCheck, int]]:
    """Every check of a machine by its Fly name, with the port it probes."""
    checks: dict[str, tuple[MachineCheck, int]] = {}
    for name, top in machine.machine_checks.items():
        checks[name] = (top, top.port)
    for service in machine.services:
        for index, check in enumerate(service.checks):
            name = service_check_name(index, check, service.internal_port)
            checks[name] = (check, check.port or service.internal_port)
    return checks


async def run_check(
    check: MachineCheck, host: str, port: int
) -> tuple[Literal["passing", "critical"], str]:
    """One attempt: ``(status, output)``."""
    try:
        async with asyncio.timeout(check.timeout_s):
            if check.type == "tcp":
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return "passing", f"connected to {host}:{port}"
            return await _http_check(check, host, port)
    except TimeoutError:
        return "critical", f"no answer from {host}:{port} within {check.timeout_s:g}s"
    except (OSError, ssl.SSLError, ValueError) as exc:
        return "critical", f"{host}:{port}: {exc}"[:MAX_OUTPUT]


async def _http_check(
    check: MachineCheck, host: str, port: int
) -> tuple[Literal["passing", "critical"], str]:
    context: ssl.SSLContext | None = None
    if check.protocol == "https":
        context = ssl.create_default_context()
        if check.tls_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(
        host,
        port,
        ssl=context,
        server_hostname=(check.tls_server_name or host) if context else None,
        limit=MAX_RESPONSE_HEAD,
    )
    try:
        method = (check.method or "GET").upper()
        path = check.path or "/"
        lines = [f"{method} {path} HTTP/1.1", f"Host: {check.tls_server_name or host}"]
        for header in check.headers:
            lines += [f"{header.name}: {value}" for value in header.values]
        lines += ["User-Agent: hangar-check", "Connection: close", "", ""]
        writer.write("\r\n".join(lines).encode("latin-1"))
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1").strip()
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return "critical", f"{method} {path}: not an HTTP answer"
    code = int(parts[1])
    output = f"{method} {path}: {status_line[9:]}"[:MAX_OUTPUT]
    return ("passing" if 200 <= code < 400 else "critical"), output


class CheckRunner:
    """Keeps one task per (started machine, check) and reports each machine's results."""

    def __init__(self, sink: CheckSink, clock: Clock, max_concurrent: int = 64) -> None:
        self.sink = sink
        self.clock = clock
        self._limit = asyncio.Semaphore(max_concurrent)
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._targets: dict[tuple[str, str], tuple[MachineCheck, str, int]] = {}
        self._results: dict[str, dict[str, CheckStatus]] = {}
        self._machines: dict[str, BackendMachine] = {}

    def update(self, machines: Sequence[BackendMachine]) -> None:
        wanted: dict[tuple[str, str], tuple[MachineCheck, str, int]] = {}
        for machine in machines:
            if machine.state != STARTED or not machine.private_ip:
                continue
            self._machines[machine.id] = machine
            for name, (check, port) in machine_checks(machine).items():
                wanted[(machine.id, name)] = (check, machine.private_ip, port)
        for key in list(self._tasks):
            if wanted.get(key) != self._targets.get(key):
                self._tasks.pop(key).cancel()
                self._targets.pop(key, None)
        loop = asyncio.get_running_loop()
        for key, target in wanted.items():
            if key not in self._tasks:
                self._targets[key] = target
                self._tasks[key] = loop.create_task(self._run(key, *target))
        live = {machine_id for machine_id, _ in wanted}
        for machine_id in list(self._results):
            if machine_id not in live:
                self._results.pop(machine_id)
                self._report(machine_id)
                continue
            names = {name for mid, name in wanted if mid == machine_id}
            stale = set(self._results[machine_id]) - names
            for name in stale:
                self._results[machine_id].pop(name)
            if stale:
                self._report(machine_id)
        for machine_id in set(self._machines) - live:
            self._machines.pop(machine_id)

    async def _run(self, key: tuple[str, str], check: MachineCheck, host: str, port: int) -> None:
        machine_id, name = key
        await self.clock.sleep(check.grace_period_s)
        while True:
            async with self._limit:
                status, output = await run_check(check, host, port)
            updated = datetime.datetime.fromtimestamp(self.clock.now(), datetime.UTC)
            result = CheckStatus(name=name, status=status, output=output, updated_at=updated)
            previous = self._results.setdefault(machine_id, {}).get(name)
            self._results[machine_id][name] = result
            if previous is None or (previous.status, previous.output) != (status, output):
                self._report(machine_id)
            await self.clock.sleep(check.interval_s)

    def _report(self, machine_id: str) -> None:
        machine = self._machines.get(machine_id)
        if machine is not None:
            results = self._results.get(machine_id, {})
            self.sink(machine, tuple(results[name] for name in sorted(results)))

    def results(self, machine_id: str) -> tuple[CheckStatus, ...]:
        results = self._results.get(machine_id, {})
        return tuple(results[name] for name in sorted(results))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
