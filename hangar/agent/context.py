"""What every step sees: its run, the machine store, the agent's own records, and time.

Everything else a step needs (the guest platform, this host's claims and GPUs) it is built
with (``hangar.agent.operations.plan_for``), so the context stays small.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hangar.clock import Clock
from hangar.errors import NotFound
from hangar.model.machine import Machine, MachineState, host_event
from hangar.model.run import RunRecord
from hangar.store.protocol import MachineStore, RunStore


@dataclass
class StepContext:
    run: RunRecord
    machines: MachineStore
    runs: RunStore
    clock: Clock
    notify: Callable[[], None]
    submit: Callable[[RunRecord], bool]

    def machine(self) -> Machine:
        machine = self.machines.get_machine(self.run.machine_id)
        if machine is None:
            raise NotFound(f"machine {self.run.machine_id} not found")
        return machine

    def record_event(
        self,
        event_type: str,
        status: str,
        *,
        reason: str = "",
        request: dict[str, Any] | None = None,
    ) -> None:
        """An event of what the host did (``request``: only Fly's, an exit's)."""
        self.machines.add_event(
            self.run.machine_id,
            host_event(event_type, status, self.clock.now(), request=request, reason=reason),
        )

    def transition(self, state: MachineState, event_type: str, reason: str = "") -> None:
        """Move the machine to ``state`` and record the event, once (re-running is a no-op)."""
        machine = self.machine()
        if machine.state == state and machine.failure_reason == reason:
            return
        self.machines.set_state(machine.id, state, self.clock.now(), reason)
        self.record_event(event_type, str(state), reason=reason)
        self.notify()
