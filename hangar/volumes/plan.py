"""Volume operations as plans of named, idempotent steps.

Each step asks "should I run?" of the world as it is (image files, keys, snapshots inside the
image) and then runs; so a plan cut short by a crash anywhere is finished by running it again
from the start. This is the same shape as the agent's durable runs
(:mod:`hangar.agent.engine`), which record each step and call these one by one; ``execute``
runs a plan directly (tests, tools).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeStep:
    name: str
    should_run: Callable[[], Awaitable[bool]]
    run: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class VolumePlan:
    """``steps`` bring the volume to the operation's goal; if one fails, ``rollback`` steps
    free what the operation took (each is idempotent too)."""

    operation: str
    volume_id: str
    steps: tuple[VolumeStep, ...]
    rollback: tuple[VolumeStep, ...] = ()

    def __post_init__(self) -> None:
        names = [step.name for step in self.steps + self.rollback]
        if len(names) != len(set(names)):
            raise ValueError(f"plan {self.operation} repeats a step name: {names}")

    @property
    def step_names(self) -> list[str]:
        return [step.name for step in self.steps]

    async def execute(self, after_step: Callable[[str], None] | None = None) -> None:
        """Run the plan; on a failing step run the rollback, then raise the step's error.
        ``after_step(name)`` is called after each step (crash tests kill the process there)."""
        for step in self.steps:
            try:
                if await step.should_run():
                    await step.run()
            except Exception:
                log.warning(
                    "volume %s: %s step %s failed", self.volume_id, self.operation, step.name
                )
                await self.undo()
                raise
            if after_step is not None:
                after_step(step.name)

    async def undo(self) -> None:
        """Run every rollback step; one that fails is logged and the rest still run."""
        for step in self.rollback:
            try:
                if await step.should_run():
                    await step.run()
            except Exception as error:
                log.error(
                    "volume %s: %s rollback step %s failed: %s",
                    self.volume_id,
                    self.operation,
                    step.name,
                    error,
                )
