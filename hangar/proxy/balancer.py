"""Balancing one app's port over its machines by load against their concurrency limits.

A machine below its ``soft_limit`` is preferred, the least loaded first (ties taken in turn);
past every soft limit the least loaded below its ``hard_limit`` still gets traffic and, when
autostart allows, another machine is woken. When every machine is at its hard limit (or none is
started yet), a request waits in a bounded queue, briefly (longer while a machine wakes), and
then gets ``ServiceUnavailable`` (503).
"""

from __future__ import annotations

import asyncio
from collections import deque

from hangar.errors import ServiceUnavailable
from hangar.proxy.routes import AppRoute, Member
from hangar.proxy.scaler import Scaler
from hangar.proxy.settings import ProxySettings


class Pool:
    def __init__(self, route: AppRoute, scaler: Scaler, settings: ProxySettings) -> None:
        self.app = route.app
        self.port = route.port
        self.route = route
        self.members: list[Member] = list(route.members)
        self.scaler = scaler
        self.settings = settings
        self.load: dict[str, int] = {}
        self._turn = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def update(self, route: AppRoute) -> None:
        self.route = route
        self.members = list(route.members)
        self.notify(everyone=True)

    def notify(self, everyone: bool = False) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    def try_acquire(self) -> Member | None:
        """The machine to send to now, its load taken; None if every one is full or none ready."""
        members = self.members
        count = len(members)
        best: Member | None = None
        best_key = (True, 0)
        for offset in range(count):
            member = members[(self._turn + offset) % count]
            if not self.scaler.ready(member):
                continue
            load = self.load.get(member.id, 0)
            limits = member.service.limits
            if limits.hard_limit is not None and load >= limits.hard_limit:
                continue
            key = (load >= limits.soft, load)
            if best is None or key < best_key:
                best, best_key = member, key
        if best is None:
            return None
        self._turn += 1
        if best_key[0]:
            # Every ready machine is past its soft limit: bring another one up if one sleeps.
            self.scaler.wake_for(members)
        self.load[best.id] = best_key[1] + 1
        self.scaler.begin(best.id)
        return best

    async def acquire(self) -> Member:
        member = self.try_acquire()
        if member is not None:
            return member
        if len(self._waiters) >= self.settings.queue_limit:
            raise ServiceUnavailable(
                f"app {self.app}: every machine is at its hard limit and the queue is full",
                app=self.app,
                reason="queue_full",
            )
        waking = self.scaler.wake_for(self.members)
        if not waking and not any(self.scaler.ready(m) for m in self.members):
            raise ServiceUnavailable(
                f"app {self.app} has no started machine for port {self.port}",
                app=self.app,
                reason="no_machine",
            )
        timeout = self.settings.wake_timeout_s if waking else self.settings.queue_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise ServiceUnavailable(
                    f"app {self.app}: no machine could take the request within {timeout:g}s",
                    app=self.app,
                    reason="wake_timeout" if waking else "queue_timeout",
                ) from None
            finally:
                if not waiter.done():
                    waiter.cancel()
            member = self.try_acquire()
            if member is not None:
                return member
            members = self.members
            # A wake ended and nothing is ready: try the next machine, or give up.
            if not any(
                m.id in self.scaler.waking or self.scaler.ready(m) for m in members
            ) and not self.scaler.wake_for(members):
                raise ServiceUnavailable(
                    f"app {self.app} has no started machine for port {self.port}",
                    app=self.app,
                    reason="no_machine",
                )

    def release(self, member: Member) -> None:
        load = self.load.get(member.id, 1) - 1
        if load > 0:
            self.load[member.id] = load
        else:
            self.load.pop(member.id, None)
        self.scaler.end(member.id)
        if self._waiters:
            self.notify()
