"""The plans of the machine operations: which steps, in which order, and how each rolls back."""

from __future__ import annotations

from hangar.agent.context import StepContext
from hangar.agent.engine import Plan, Step
from hangar.agent.gpu_steps import (
    BindGpus,
    ClaimGpus,
    QuarantineGpu,
    ReleaseGpus,
    ResetGpu,
    RestoreHostDrivers,
    ReturnGpu,
)
from hangar.agent.steps import (
    ApplyConfig,
    ApplyRestartPolicy,
    DropLease,
    LaunchVm,
    MarkFailed,
    MarkStoppedAfterFailure,
    PrepareInitrd,
    PrepareRootDisk,
    RecordExit,
    ReleaseVm,
    RemoveRunDir,
    ResolveImage,
    StopVm,
    Transition,
)
from hangar.model.machine import MachineState as S


def _boot_steps(gate: str = "") -> list[Step]:
    return [
        Transition("mark_starting", S.STARTING, "start", only_if_param=gate),
        ResolveImage(),
        _Gated(ClaimGpus(), gate),
        _Gated(BindGpus(), gate),
        _Gated(PrepareRootDisk(), gate),
        _Gated(PrepareInitrd(), gate),
        _Gated(LaunchVm(), gate),
        Transition("mark_started", S.STARTED, "start", only_if_param=gate),
    ]


def _halt_steps() -> list[Step]:
    return [StopVm(), RecordExit(), ReleaseVm(), ReleaseGpus()]


class _Gated:
    """A step that runs only when the run's params set ``gate`` (an empty gate always runs)."""

    def __init__(self, inner: Step, gate: str) -> None:
        self._inner = inner
        self._gate = gate
        self.name = inner.name

    async def should_run(self, ctx: StepContext) -> bool:
        if self._gate and not ctx.run.params.get(self._gate):
            return False
        return await self._inner.should_run(ctx)

    async def run(self, ctx: StepContext) -> None:
        await self._inner.run(ctx)


_LAUNCH_ROLLBACK: list[Step] = [ReleaseVm(), ReleaseGpus(), MarkFailed()]

PLANS: dict[str, Plan] = {
    plan.operation: plan
    for plan in (
        Plan("create", _boot_steps(), _LAUNCH_ROLLBACK),
        Plan("start", _boot_steps(), _LAUNCH_ROLLBACK),
        Plan("prepare", [ResolveImage()], [MarkFailed()]),
        Plan(
            "stop",
            [
                Transition("mark_stopping", S.STOPPING, "stop"),
                *_halt_steps(),
                Transition("mark_stopped", S.STOPPED, "stop"),
            ],
            [ReleaseVm(), ReleaseGpus(), MarkStoppedAfterFailure()],
        ),
        Plan(
            "restart",
            [Transition("mark_stopping", S.STOPPING, "restart"), *_halt_steps(), *_boot_steps()],
            _LAUNCH_ROLLBACK,
        ),
        Plan(
            "update",
            [
                Transition("mark_replacing", S.REPLACING, "update", only_if_param="was_running"),
                *_halt_steps(),
                ApplyConfig(),
                *_boot_steps(gate="was_running"),
            ],
            _LAUNCH_ROLLBACK,
        ),
        Plan(
            "exit",
            [
                RecordExit(),
                ReleaseVm(),
                Transition("mark_stopped", S.STOPPED, "stop"),
                ApplyRestartPolicy(),
            ],
            [ReleaseVm(), ReleaseGpus(), MarkStoppedAfterFailure()],
        ),
        Plan(
            "destroy",
            [
                Transition("mark_destroying", S.DESTROYING, "destroy"),
                *_halt_steps(),
                RemoveRunDir(),
                DropLease(),
                Transition("mark_destroyed", S.DESTROYED, "destroy"),
            ],
            [
                ReleaseVm(),
                RemoveRunDir(),
                DropLease(),
                Transition("mark_destroyed", S.DESTROYED, "destroy"),
            ],
        ),
        Plan("handoff", [ResetGpu(), RestoreHostDrivers(), ReturnGpu()], [QuarantineGpu()]),
    )
}
