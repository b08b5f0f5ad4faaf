"""From a snapshot of machines to what the proxy publishes: one listener per host port, and on
each the apps it routes to and the machines behind each app (pure, no I/O).

A port is ``http`` (routed by ``Host``), ``tls`` (routed by SNI, then HTTP or raw bytes), ``tcp``
or ``udp`` (raw: one app only, since nothing in the bytes names the app). An app that asks for
a port another app holds in another way is left out and named in ``RoutePlan.conflicts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from hangar.model.services import MachinePort, MachineService
from hangar.proxy.backends import STARTED, BackendMachine

ListenerKind = Literal["http", "tls", "tcp", "udp"]


def listener_kind(service: MachineService, port: MachinePort) -> ListenerKind:
    if service.protocol == "udp":
        return "udp"
    if not port.handlers:
        return "tcp"
    return "tls" if port.handlers[0] == "tls" else "http"


@dataclass(frozen=True)
class Member:
    """One machine behind one app's port: the service that publishes it there."""

    machine: BackendMachine
    service_index: int

    @property
    def id(self) -> str:
        return self.machine.id

    @cached_property
    def service(self) -> MachineService:
        return self.machine.services[self.service_index]

    @cached_property
    def address(self) -> tuple[str, int]:
        return self.machine.private_ip, self.service.internal_port

    @cached_property
    def routable(self) -> bool:
        """Started, addressed, not cordoned, and its gating checks not failing or pending."""
        machine = self.machine
        return (
            machine.state == STARTED
            and bool(machine.private_ip)
            and not machine.cordoned
            and machine.check_state(self.service_index) == "passing"
        )


@dataclass
class AppRoute:
    """One app on one host port."""

    app: str
    port: int
    handlers: tuple[str, ...]
    force_https: bool
    response_headers: dict[str, str | list[str] | bool]
    members: list[Member] = field(default_factory=list)

    @property
    def http(self) -> bool:
        return "http" in self.handlers


@dataclass
class PortPlan:
    port: int
    kind: ListenerKind
    routes: dict[str, AppRoute] = field(default_factory=dict)


@dataclass
class RoutePlan:
    ports: dict[int, PortPlan] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)


def plan_routes(machines: Sequence[BackendMachine]) -> RoutePlan:
    """Every published port with its apps and members; machines in id order, apps by name."""
    plan = RoutePlan()
    for machine in sorted(machines, key=lambda item: (item.app, item.id)):
        seen: set[int] = set()
        for index, service in enumerate(machine.services):
            for port in service.ports:
                for number in port.numbers:
                    if number in seen:
                        plan.conflicts.append(
                            f"machine {machine.id} of app {machine.app} publishes port "
                            f"{number} twice; the first service keeps it"
                        )
                        continue
                    seen.add(number)
                    _add(plan, machine, index, service, port, number)
    return plan


def _add(
    plan: RoutePlan,
    machine: BackendMachine,
    index: int,
    service: MachineService,
    port: MachinePort,
    number: int,
) -> None:
    kind = listener_kind(service, port)
    existing = plan.ports.get(number)
    if existing is None:
        existing = plan.ports[number] = PortPlan(number, kind)
    elif existing.kind != kind:
        plan.conflicts.append(
            f"app {machine.app} asks for {kind} on port {number}, which is {existing.kind} "
            f"for app {next(iter(existing.routes))}; left out"
        )
        return
    elif kind in ("tcp", "udp") and machine.app not in existing.routes:
        plan.conflicts.append(
            f"app {machine.app} asks for raw {kind} port {number}, which app "
            f"{next(iter(existing.routes))} holds; left out"
        )
        return
    route = existing.routes.get(machine.app)
    if route is None:
        response = port.http_options.response if port.http_options else None
        route = existing.routes[machine.app] = AppRoute(
            app=machine.app,
            port=number,
            handlers=tuple(port.handlers),
            force_https=port.force_https,
            response_headers=dict(response.headers) if response else {},
        )
    route.members.append(Member(machine, index))
