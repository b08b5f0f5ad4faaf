"""The durable run engine: a run is a plan of named idempotent steps, recorded around each step.

Each step answers "should I run?" from the world as it is (files, processes, records), then
runs. Before a step the run records which step it is in; after it, that the step is done. A
crash anywhere is therefore resumed by running the plan again from the first step not done:
the step in flight asks "should I run?" once more. A step that fails switches the run to its
rollback plan, whose steps are idempotent in the same way and are resumed the same way.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from hangar.settings import env_name
from hangar.store.protocol import RunRecord, RunStatus

if TYPE_CHECKING:
    from hangar.agent.context import StepContext

log = logging.getLogger(__name__)

CRASH_AFTER_STEP_ENV = env_name("crash_after_step")


class Step(Protocol):
    @property
    def name(self) -> str: ...

    async def should_run(self, ctx: StepContext) -> bool: ...

    async def run(self, ctx: StepContext) -> None: ...


@dataclass(frozen=True)
class Plan:
    operation: str
    steps: Sequence[Step]
    rollback: Sequence[Step]

    def __post_init__(self) -> None:
        names = [step.name for step in self.steps]
        if len(names) != len(set(names)):
            raise ValueError(f"plan {self.operation} repeats a step name: {names}")


CrashHook = Callable[[str, str], None]


def no_crash(operation: str, step_name: str) -> None:
    """The crash hook outside crash tests."""


def crash_after(target: str) -> CrashHook:
    """Test hook: ``crash_after("start:launch_vm")`` (``HANGAR_CRASH_AFTER_STEP``) SIGKILLs this
    process right after that step is recorded; an empty target never crashes."""
    if not target:
        return no_crash

    def hook(operation: str, step_name: str) -> None:
        if target == f"{operation}:{step_name}":
            log.warning("crash injected after %s:%s", operation, step_name)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class RunEngine:
    """Executes runs; ``crash_hook(operation, step)`` is called after each recorded step
    (tests make it kill the process there: :func:`crash_after`)."""

    def __init__(self, plans: dict[str, Plan], crash_hook: CrashHook = no_crash) -> None:
        self._plans = plans
        self._crash_hook = crash_hook

    async def execute(self, run: RunRecord, ctx: StepContext) -> RunRecord:
        plan = self._plans[run.operation]
        if run.status == RunStatus.RUNNING:
            await self._forward(plan, run, ctx)
        if run.status == RunStatus.ROLLING_BACK:
            await self._rollback(plan, run, ctx)
        return run

    async def _forward(self, plan: Plan, run: RunRecord, ctx: StepContext) -> None:
        for step in plan.steps:
            if step.name in run.steps_done:
                continue
            self._record(run, ctx, current=step.name)
            started = ctx.clock.monotonic()
            try:
                if await step.should_run(ctx):
                    await step.run(ctx)
                    run.data.setdefault("step_seconds", {})[step.name] = round(
                        ctx.clock.monotonic() - started, 4
                    )
            except Exception as exc:
                log.warning("run %s step %s failed: %s", run.id, step.name, exc)
                run.status = RunStatus.ROLLING_BACK
                run.error = f"{step.name}: {exc}"
                self._record(run, ctx, current="")
                return
            run.steps_done.append(step.name)
            self._record(run, ctx, current="")
            self._crash_hook(run.operation, step.name)
        run.status = RunStatus.SUCCEEDED
        self._record(run, ctx, current="")

    async def _rollback(self, plan: Plan, run: RunRecord, ctx: StepContext) -> None:
        for step in plan.rollback:
            if step.name in run.rollback_done:
                continue
            self._record(run, ctx, current=f"rollback:{step.name}")
            try:
                if await step.should_run(ctx):
                    await step.run(ctx)
            except Exception as exc:
                # A rollback step that fails is recorded and skipped: the remaining steps still
                # free what they can, and reconciliation sweeps anything left on restart.
                log.error("run %s rollback step %s failed: %s", run.id, step.name, exc)
                run.data.setdefault("rollback_errors", []).append(f"{step.name}: {exc}")
            run.rollback_done.append(step.name)
            self._record(run, ctx, current="")
            self._crash_hook(run.operation, f"rollback:{step.name}")
        run.status = RunStatus.FAILED
        self._record(run, ctx, current="")

    @staticmethod
    def _record(run: RunRecord, ctx: StepContext, current: str) -> None:
        run.data["current_step"] = current
        run.updated_at = ctx.clock.now()
        ctx.store.save_run(run)
