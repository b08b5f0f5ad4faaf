"""What a step sees: the run it belongs to and the host's services."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hangar.agent.gpus import HostGpus
from hangar.agent.platform import GuestPlatform
from hangar.clock import Clock
from hangar.errors import NotFound
from hangar.model.machine import Machine, MachineEvent, MachineState, new_event_id
from hangar.store.protocol import ClusterStore, RunRecord


@dataclass
class StepContext:
    run: RunRecord
    store: ClusterStore
    clock: Clock
    platform: GuestPlatform
    machines_dir: Path
    notify: Callable[[], None]
    submit: Callable[[RunRecord], bool]
    gpus: HostGpus | None = None

    def machine(self) -> Machine:
        machine = self.store.get_machine(self.run.machine_id)
        if machine is None:
            raise NotFound(f"machine {self.run.machine_id} not found")
        return machine

    @property
    def run_dir(self) -> Path:
        return self.machines_dir / self.run.machine_id

    def record_event(
        self, event_type: str, status: str, request: dict[str, Any] | None = None
    ) -> None:
        body = {"run_id": self.run.id, "operation": self.run.operation, **(request or {})}
        event = MachineEvent(
            id=new_event_id(),
            type=event_type,
            status=status,
            source="hangar",
            timestamp=int(self.clock.now() * 1000),
            request=body,
        )
        self.store.add_event(self.run.machine_id, event)

    def transition(
        self,
        state: MachineState,
        event_type: str,
        reason: str = "",
        request: dict[str, Any] | None = None,
    ) -> None:
        """Move the machine to ``state`` and record the event, once (re-running is a no-op)."""
        machine = self.machine()
        if machine.state == state and machine.failure_reason == reason:
            return
        self.store.set_state(machine.id, state, self.clock.now(), reason)
        details = dict(request or {})
        if reason:
            details["reason"] = reason
        self.record_event(event_type, str(state), details)
        self.notify()
