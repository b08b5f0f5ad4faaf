"""The proxy as its own process over a backends file: ``hangar proxy --backends FILE``.

The file is read again whenever it changes; the checks runner's results feed the same
backends, so a failing check takes a machine out of rotation here too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path

from hangar.clock import Clock, SystemClock
from hangar.errors import HangarError
from hangar.proxy.checks import CheckRunner
from hangar.proxy.proxy import Proxy
from hangar.proxy.settings import ProxySettings
from hangar.proxy.static import MemoryBackends, load_backends_file

log = logging.getLogger(__name__)
RELOAD_INTERVAL_S = 2.0
# The line ``hangar proxy`` logs for each listener: service port, host address, host port.
LISTENING_LINE = re.compile(r"proxy: port (\d+) -> (\S+):(\d+)")


def proxy_command(backends: Path, domain: str, bind: str, port_map: dict[int, int]) -> list[str]:
    """The command line of a ``hangar proxy`` process serving ``backends``."""
    argv = [sys.executable, "-m", "hangar.cli.main", "proxy", "--backends", str(backends)]
    argv += ["--domain", domain, "--bind", bind]
    for port, host_port in sorted(port_map.items()):
        argv += ["--port-map", f"{port}={host_port}"]
    return argv


def listening_port(text: str, port: int) -> int | None:
    """The host port the listener for ``port`` got, from ``hangar proxy``'s log."""
    for match in LISTENING_LINE.finditer(text):
        if int(match.group(1)) == port:
            return int(match.group(3))
    return None


async def _feed_checks(backends: MemoryBackends, runner: CheckRunner) -> None:
    async for machines in backends.watch():
        runner.update(machines)


async def _reload(path: Path, backends: MemoryBackends, clock: Clock) -> None:
    stamp = path.stat().st_mtime_ns
    while True:
        await clock.sleep(RELOAD_INTERVAL_S)
        try:
            current = path.stat().st_mtime_ns
            if current != stamp:
                stamp = current
                backends.replace_all(load_backends_file(path))
                log.info("proxy: reloaded %s", path)
        except (OSError, HangarError) as exc:
            log.error("proxy: keeping the previous backends: %s", exc)


async def serve_backends_file(
    path: Path, settings: ProxySettings, ready: asyncio.Event | None = None
) -> None:
    """Run until cancelled."""
    clock = SystemClock()
    backends = MemoryBackends(load_backends_file(path))
    runner = CheckRunner(backends.set_checks, clock)
    proxy = Proxy(backends, settings, clock)
    tasks = [
        asyncio.create_task(_feed_checks(backends, runner)),
        asyncio.create_task(_reload(path, backends, clock)),
    ]
    try:
        await proxy.start()
        for port, listener in sorted(proxy.listeners.items()):
            # LISTENING_LINE reads this line back.
            log.info("proxy: port %d -> %s:%d", port, settings.bind_host, listener.host_port)
        for problem in [*proxy.conflicts, *proxy.problems.values()]:
            log.warning("proxy: %s", problem)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        for task in tasks:
            task.cancel()
        await runner.close()
        await proxy.close()
