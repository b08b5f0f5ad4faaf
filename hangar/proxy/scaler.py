"""Autostart and autostop: wake a stopped machine for a request, stop machines left idle.

The scaler keeps the latest snapshot of machines, how busy each is and when it last served
(on the injected clock), which machines it is waking or stopping, and which woken machines
without checks have not yet been seen accepting on their port. Pools ask it whether a member
is ready and to wake one; its autostop pass never goes below ``min_machines_running``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from hangar.clock import Clock
from hangar.errors import HangarError
from hangar.proxy.backends import STARTED, WAKEABLE_STATES, BackendMachine, Backends, StopMode
from hangar.proxy.routes import Member
from hangar.proxy.settings import ProxySettings

log = logging.getLogger(__name__)


def stop_mode(machine: BackendMachine) -> StopMode | None:
    """How autostop treats a machine: the first of its services that asks for it decides."""
    for service in machine.services:
        if service.autostop_mode != "off":
            return "suspend" if service.autostop_mode == "suspend" else "stop"
    return None


async def port_accepts(host: str, port: int, timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class Scaler:
    def __init__(self, backends: Backends, settings: ProxySettings, clock: Clock) -> None:
        self.backends = backends
        self.settings = settings
        self.clock = clock
        self.machines: dict[str, BackendMachine] = {}
        self.inflight: dict[str, int] = {}
        self.last_active: dict[str, float] = {}
        self.waking: dict[str, asyncio.Task[None]] = {}
        self.stopping: set[str] = set()
        self.unprobed: set[str] = set()
        self.on_ready: Callable[[], None] = lambda: None
        self.probe: Callable[[str, int, bool], Awaitable[bool]] = self._plain_probe
        """Whether a woken machine's port accepts; ``(host, port, http)``. The proxy replaces
        it with one that keeps the connection for the request that is waiting."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed: asyncio.Future[None] | None = None

    # snapshot and activity
    def update(self, machines: Sequence[BackendMachine]) -> None:
        now = self.clock.monotonic()
        for machine in machines:
            previous = self.machines.get(machine.id)
            if machine.state == STARTED and (previous is None or previous.state != STARTED):
                self.last_active[machine.id] = now
            if machine.state != STARTED:
                self.stopping.discard(machine.id)
        self.machines = {machine.id: machine for machine in machines}
        for gone in set(self.last_active) - set(self.machines):
            self.last_active.pop(gone, None)
            self.inflight.pop(gone, None)
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    def begin(self, machine_id: str) -> None:
        self.inflight[machine_id] = self.inflight.get(machine_id, 0) + 1
        self.last_active[machine_id] = self.clock.monotonic()

    def end(self, machine_id: str) -> None:
        self.inflight[machine_id] = self.inflight.get(machine_id, 1) - 1
        self.last_active[machine_id] = self.clock.monotonic()

    def ready(self, member: Member) -> bool:
        return member.routable and member.id not in self.unprobed and member.id not in self.stopping

    async def _next_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # autostart
    def wake_for(self, members: Iterable[Member]) -> bool:
        """Start one machine of ``members`` unless one is already waking; False if none can."""
        candidates = []
        for member in members:
            if member.id in self.waking:
                return True
            machine = self.machines.get(member.id, member.machine)
            if not member.service.autostart_on:
                continue
            if machine.state in WAKEABLE_STATES or member.id in self.stopping:
                candidates.append(member)
        if not candidates:
            return False
        # A suspended machine resumes faster than a stopped one boots; then by id, for order.
        candidates.sort(
            key=lambda m: (self.machines.get(m.id, m.machine).state != "suspended", m.id)
        )
        chosen = candidates[0]
        self.waking[chosen.id] = self._spawn(self._wake(chosen))
        return True

    async def _wake(self, member: Member) -> None:
        machine_id = member.id
        try:
            async with asyncio.timeout(self.settings.wake_timeout_s):
                while machine_id in self.stopping:
                    await self._next_change()
                machine = self.machines.get(machine_id, member.machine)
                if machine.state in WAKEABLE_STATES:
                    if not machine.gating_checks(member.service_index):
                        # Nothing gates it but its port: wait to see the port accept.
                        self.unprobed.add(machine_id)
                    log.info("autostart: starting machine %s of app %s", machine_id, machine.app)
                    await self.backends.start(machine)
                while not self._started(machine_id):
                    await self._next_change()
                if machine_id in self.unprobed:
                    await self._probe(machine_id, member)
                while not self._passing(machine_id, member.service_index):
                    await self._next_change()
        except (TimeoutError, HangarError, OSError) as exc:
            log.warning("autostart of machine %s failed: %s", machine_id, exc)
        finally:
            self.unprobed.discard(machine_id)
            self.waking.pop(machine_id, None)
            self.on_ready()

    def _started(self, machine_id: str) -> bool:
        machine = self.machines.get(machine_id)
        return machine is not None and machine.state == STARTED and bool(machine.private_ip)

    def _passing(self, machine_id: str, service_index: int) -> bool:
        machine = self.machines.get(machine_id)
        if machine is None or machine.state != STARTED:
            raise HangarError(f"machine {machine_id} left started while waking")
        return machine.check_state(service_index) == "passing"

    async def _probe(self, machine_id: str, member: Member) -> None:
        while True:
            machine = self.machines.get(machine_id)
            if machine is None or machine.state != STARTED:
                raise HangarError(f"machine {machine_id} left started while waking")
            service = machine.services[member.service_index]
            http = any("http" in port.handlers for port in service.ports)
            if await self.probe(machine.private_ip, service.internal_port, http):
                self.unprobed.discard(machine_id)
                return
            await asyncio.sleep(self.settings.probe_interval_s)

    async def _plain_probe(self, host: str, port: int, http: bool) -> bool:
        return await port_accepts(host, port, self.settings.connect_timeout_s)

    # autostop
    async def run_autostop(self) -> None:
        while True:
            await self.clock.sleep(self.settings.autostop_interval_s)
            self.autostop_pass()

    def autostop_pass(self) -> list[str]:
        """Stop machines idle past ``idle_stop_s``, keeping ``min_machines_running`` per app."""
        now = self.clock.monotonic()
        by_app: dict[str, list[BackendMachine]] = {}
        for machine in self.machines.values():
            by_app.setdefault(machine.app, []).append(machine)
        stopped: list[str] = []
        for machines in by_app.values():
            running = [m for m in machines if m.state == STARTED and m.id not in self.stopping]
            keep = max((s.min_running for m in machines for s in m.services), default=0)
            idle = [
                m
                for m in running
                if stop_mode(m) is not None
                and self.inflight.get(m.id, 0) <= 0
                and m.id not in self.waking
                and now - self.last_active.get(m.id, now) >= self.settings.idle_stop_s
            ]
            idle.sort(key=lambda m: (self.last_active.get(m.id, now), m.id))
            for machine in idle[: max(0, len(running) - keep)]:
                mode = stop_mode(machine)
                assert mode is not None
                self.stopping.add(machine.id)
                stopped.append(machine.id)
                self._spawn(self._stop(machine, mode))
        return stopped

    async def _stop(self, machine: BackendMachine, mode: StopMode) -> None:
        log.info("autostop: %s machine %s of app %s (idle)", mode, machine.id, machine.app)
        try:
            await self.backends.stop(machine, mode)
        except (HangarError, OSError) as exc:
            log.warning("autostop of machine %s failed: %s", machine.id, exc)
            self.stopping.discard(machine.id)
