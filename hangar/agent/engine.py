"""The durable run engine: a run is a plan of named idempotent steps, recorded around each step.

Each step answers "should I run?" from the world as it is (files, processes, records), then
runs. Before a step the run records which step it is in; after it, that the step is done. A
crash anywhere is therefore resumed by running the plan again from the first step not done:
the step in flight asks "should I run?" once more. A step whose error is retryable (a busy
store, a monitor that timed out, a registry that did not answer) is tried again a bounded
number of times with backoff, each retry recorded; any other failure switches the run to its
rollback plan, whose steps are idempotent in the same way and are resumed the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hangar.errors import HangarError
from hangar.model.run import RunRecord, RunStatus, StepRetry
from hangar.settings import env_name

if TYPE_CHECKING:
    from hangar.agent.context import StepContext

log = logging.getLogger(__name__)

CRASH_AFTER_STEP_ENV = env_name("crash_after_step")
CRASH_AFTER_STEP_FILE_ENV = env_name("crash_after_step_file")


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


PlanFor = Callable[[RunRecord], Plan]


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries, with exponential backoff, of a step whose error is retryable."""

    attempts: int = 4
    first_delay_s: float = 0.25
    factor: float = 2.0
    max_delay_s: float = 4.0

    def delay_s(self, retry: int) -> float:
        return float(min(self.max_delay_s, self.first_delay_s * self.factor**retry))


def is_retryable(error: BaseException) -> bool:
    """Errors that say so, and a SQLite database that stayed busy past its timeout."""
    if isinstance(error, HangarError):
        return error.retryable
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


class RunObserver(Protocol):
    """Told what the engine does, after it is recorded (metrics, metering). An observer that
    raises is logged and ignored: it never changes how a run goes."""

    def step_started(self, run: RunRecord, step: str) -> None: ...

    def step_finished(
        self, run: RunRecord, step: str, ran: bool, seconds: float, error: BaseException | None
    ) -> None:
        """``step`` (``rollback:NAME`` in a rollback) is over: ``ran`` is False when it had
        nothing to do; ``error`` is why it failed."""
        ...

    def step_retried(self, run: RunRecord, step: str, error: BaseException) -> None: ...

    def run_finished(self, run: RunRecord) -> None: ...


CrashHook = Callable[[str, str], None]


def no_crash(operation: str, step_name: str) -> None:
    """The crash hook outside crash tests."""


def crash_after(target: str, target_file: Path | None = None) -> CrashHook:
    """Test hook: ``crash_after("start:launch_vm")`` (``HANGAR_CRASH_AFTER_STEP``) SIGKILLs this
    process right after that step is recorded; an empty target never crashes. With
    ``target_file`` (``HANGAR_CRASH_AFTER_STEP_FILE``), the target is read from that file at
    each step instead, and the file is removed as the crash fires: a test arms a running
    process and finds it unarmed when it starts it again."""
    if target_file is not None:
        return _crash_after_file(target_file)
    if not target:
        return no_crash

    def hook(operation: str, step_name: str) -> None:
        if target == f"{operation}:{step_name}":
            _crash(operation, step_name)

    return hook


def _crash_after_file(target_file: Path) -> CrashHook:
    def hook(operation: str, step_name: str) -> None:
        try:
            target = target_file.read_text().strip()
        except FileNotFoundError:
            return
        if target == f"{operation}:{step_name}":
            target_file.unlink(missing_ok=True)
            _crash(operation, step_name)

    return hook


def _crash(operation: str, step_name: str) -> None:
    log.warning("crash injected after %s:%s", operation, step_name)
    os.kill(os.getpid(), signal.SIGKILL)


class RunEngine:
    """Executes runs with the plan ``plan_for`` builds from each run's request;
    ``crash_hook(operation, step)`` is called after each recorded step (tests make it kill the
    process there: :func:`crash_after`)."""

    def __init__(
        self,
        plan_for: PlanFor,
        crash_hook: CrashHook = no_crash,
        retry: RetryPolicy | None = None,
        observers: Sequence[RunObserver] = (),
    ) -> None:
        self._plan_for = plan_for
        self._crash_hook = crash_hook
        self._retry = retry or RetryPolicy()
        self._observers = tuple(observers)

    def _tell(self, method: str, *args: object) -> None:
        for observer in self._observers:
            try:
                getattr(observer, method)(*args)
            except Exception:
                log.exception("run observer %r failed in %s", observer, method)

    async def execute(self, run: RunRecord, ctx: StepContext) -> RunRecord:
        plan = self._plan_for(run)
        if run.status == RunStatus.RUNNING:
            await self._forward(plan, run, ctx)
        if run.status == RunStatus.ROLLING_BACK:
            await self._rollback(plan, run, ctx)
        if not run.status.unfinished:
            self._tell("run_finished", run)
        return run

    async def _forward(self, plan: Plan, run: RunRecord, ctx: StepContext) -> None:
        for step in plan.steps:
            if step.name in run.steps_done:
                continue
            self._record(run, ctx, current=step.name)
            self._tell("step_started", run, step.name)
            started = ctx.clock.monotonic()
            try:
                ran = await self._run_step(step, run, ctx)
            except Exception as exc:
                log.warning("run %s step %s failed: %s", run.id, step.name, exc)
                run.status = RunStatus.ROLLING_BACK
                run.error = f"{step.name}: {exc}"
                self._record(run, ctx, current="")
                self._tell("step_finished", run, step.name, True, self._since(ctx, started), exc)
                return
            run.steps_done.append(step.name)
            self._record(run, ctx, current="")
            self._tell("step_finished", run, step.name, ran, self._since(ctx, started), None)
            self._crash_hook(run.operation, step.name)
        run.status = RunStatus.SUCCEEDED
        self._record(run, ctx, current="")

    @staticmethod
    def _since(ctx: StepContext, started: float) -> float:
        return max(0.0, ctx.clock.monotonic() - started)

    async def _run_step(self, step: Step, run: RunRecord, ctx: StepContext) -> bool:
        """Should it run, then run it (True if it ran); a retryable error is tried again after
        a backoff, a bounded number of times, each retry recorded in the run."""
        retry = 0
        while True:
            started = ctx.clock.monotonic()
            try:
                if await step.should_run(ctx):
                    await step.run(ctx)
                    run.progress.step_seconds[step.name] = round(ctx.clock.monotonic() - started, 4)
                    return True
                return False
            except Exception as exc:
                if not is_retryable(exc) or retry + 1 >= self._retry.attempts:
                    raise
                delay = self._retry.delay_s(retry)
                retry += 1
                log.info(
                    "run %s step %s: retry %d in %.2fs (%s)", run.id, step.name, retry, delay, exc
                )
                run.progress.retries.append(
                    StepRetry(
                        step=step.name,
                        attempt=retry,
                        error=str(exc),
                        delay_s=delay,
                        at=ctx.clock.now(),
                    )
                )
                self._record(run, ctx, current=step.name)
                self._tell("step_retried", run, step.name, exc)
                await ctx.clock.sleep(delay)

    async def _rollback(self, plan: Plan, run: RunRecord, ctx: StepContext) -> None:
        for step in plan.rollback:
            if step.name in run.rollback_done:
                continue
            label = f"rollback:{step.name}"
            self._record(run, ctx, current=label)
            self._tell("step_started", run, label)
            started = ctx.clock.monotonic()
            ran = True
            failure: BaseException | None = None
            try:
                ran = await self._run_step(step, run, ctx)
            except Exception as exc:
                # A rollback step that fails is recorded and skipped: the remaining steps still
                # free what they can, and reconciliation sweeps anything left on restart.
                log.error("run %s rollback step %s failed: %s", run.id, step.name, exc)
                run.progress.rollback_errors.append(f"{step.name}: {exc}")
                failure = exc
            run.rollback_done.append(step.name)
            self._record(run, ctx, current="")
            self._tell("step_finished", run, label, ran, self._since(ctx, started), failure)
            self._crash_hook(run.operation, f"rollback:{step.name}")
        run.status = RunStatus.FAILED
        self._record(run, ctx, current="")

    @staticmethod
    def _record(run: RunRecord, ctx: StepContext, current: str) -> None:
        run.progress.current_step = current
        run.updated_at = ctx.clock.now()
        ctx.runs.save_run(run)
