"""The plans of the operations: which steps, in which order, how each rolls back, each step
built from the run's typed request with exactly the inputs it needs.

A machine's boot attaches its volumes (``attach_volumes``, after its claim) and carries them
into its initrd and launch; stop, exit, destroy and a failed launch let go of them
(``detach_volumes``, once its VMM is gone). A volume's own operations (subject ``vol:ID``)
are the volume library's steps under the same names, with the record's changes around them.

``plan_for`` is deterministic in the run's request, so a run resumed after a crash gets the
same steps: the engine skips those recorded as done, and the step in flight asks "should I
run?" again.
"""

from __future__ import annotations

from hangar.agent.engine import Plan, Step
from hangar.agent.gpu_steps import (
    HANDOFF_SUBJECT_PREFIX,
    BindGpus,
    ClaimGpuGroups,
    CollectGpuXids,
    MapGpuAddresses,
    PrepareNvlink,
    QuarantineGroup,
    handoff_steps,
)
from hangar.agent.host import HostServices
from hangar.agent.steps import (
    ApplyConfig,
    ApplyRestartPolicy,
    AttachNetwork,
    DetachNetwork,
    DropLease,
    DropSnapshot,
    ForgetVm,
    LaunchVm,
    MarkFailed,
    MarkStoppedAfterFailure,
    PlaceMachine,
    PrepareInitrd,
    PrepareRootDisk,
    PrepareRootTree,
    RecordExit,
    ReleaseClaim,
    ReleaseVm,
    RemoveRunDir,
    ResolveImage,
    ResumeVm,
    SettleSuspend,
    StopIfSuspended,
    StopVm,
    SuspendVm,
    Transition,
)
from hangar.agent.volume_steps import (
    AttachVolumes,
    DetachVolumes,
    ForgetSnapshot,
    ImageStep,
    MountVolumes,
    MoveVolume,
    RecordSnapshot,
    RecordVolumeSize,
    RestoreVolume,
    UnmountVolumes,
    host_volumes,
    library_plan,
    volume_of,
)
from hangar.model.machine import MachineState as S
from hangar.model.run import (
    VOLUME_SUBJECT_PREFIX,
    CreateRequest,
    DestroyRequest,
    ExitRequest,
    HandoffRequest,
    PrepareRequest,
    RestartRequest,
    RunRecord,
    RunRequest,
    StartRequest,
    StopRequest,
    SuspendRequest,
    UpdateRequest,
    VolumeCreateRequest,
    VolumeDeleteRequest,
    VolumeDeleteSnapshotRequest,
    VolumeExtendRequest,
    VolumeRequest,
    VolumeSnapshotRequest,
)
from hangar.model.volume import BEING_MADE, VolumeState
from hangar.volumes import VolumeStep


def plan_for(run: RunRecord, host: HostServices) -> Plan:
    return build_plan(run.request, run.machine_id, host)


def build_plan(request: RunRequest, subject: str, host: HostServices) -> Plan:
    if isinstance(request, HandoffRequest):
        return _handoff(request, host)
    if subject.startswith(HANDOFF_SUBJECT_PREFIX):
        raise ValueError(f"{subject} is a GPU; only a handoff runs on it")
    if isinstance(request, VolumeRequest):
        return _volume(request, subject, host)
    if subject.startswith(VOLUME_SUBJECT_PREFIX):
        raise ValueError(f"{subject} is a volume; only volume operations run on it")
    run_dir = host.run_dir(subject)
    launch_rollback: list[Step] = [
        ReleaseVm(host),
        UnmountVolumes(host),
        CollectGpuXids(host, run_dir),
        DetachNetwork(host),
        DetachVolumes(host, keep_if_suspended=True),
        ReleaseClaim(host),
        MarkFailed(snapshot=host.suspend_state(subject)),
    ]

    def boot(fresh_image: bool) -> list[Step]:
        # A suspended machine is restored (resume_vm) on its tap (and a sandbox's with its
        # volumes mounted on the host), so those come first;
        # the cold boot's steps after it then find their work done, or do it when the
        # snapshot could not be restored.
        return [
            Transition("mark_starting", S.STARTING, "start"),
            ResolveImage(host.platform, fresh=fresh_image),
            PlaceMachine(host),
            AttachVolumes(host),
            ClaimGpuGroups(host),
            BindGpus(host),
            PrepareNvlink(host),
            AttachNetwork(host),
            MountVolumes(host),
            ResumeVm(host),
            PrepareRootDisk(host.platform, run_dir),
            PrepareRootTree(host.platform, run_dir),
            PrepareInitrd(host, run_dir),
            LaunchVm(host),
            MapGpuAddresses(host),
            Transition("mark_started", S.STARTED, "start"),
        ]

    def give_back(*, keep_if_restarting: bool = False) -> list[Step]:
        """What a machine that no longer runs gives back: its tap, its volumes, its claim."""
        return [
            DetachNetwork(host, keep_if_restarting=keep_if_restarting),
            DetachVolumes(host, keep_if_restarting=keep_if_restarting),
            ReleaseClaim(host, keep_if_restarting=keep_if_restarting),
        ]

    def halt(
        *, requested: bool, timeout_s: float | None = None, signum: int | None = None
    ) -> list[Step]:
        return [
            StopVm(host.platform, timeout_s=timeout_s, signum=signum),
            RecordExit(host.platform, requested=requested),
            CollectGpuXids(host, run_dir),
            DropSnapshot(host),
            ReleaseVm(host),
            UnmountVolumes(host),
        ]

    match request:
        case CreateRequest():
            return Plan("create", boot(fresh_image=True), launch_rollback)
        case StartRequest():
            return Plan("start", boot(fresh_image=False), launch_rollback)
        case PrepareRequest():
            return Plan("prepare", [ResolveImage(host.platform, fresh=True)], [MarkFailed()])
        case StopRequest():
            return Plan(
                "stop",
                [
                    Transition("mark_stopping", S.STOPPING, "stop"),
                    *halt(requested=True, timeout_s=request.timeout_s, signum=request.signal),
                    *give_back(),
                    Transition("mark_stopped", S.STOPPED, "stop"),
                ],
                [
                    ReleaseVm(host),
                    UnmountVolumes(host),
                    CollectGpuXids(host, run_dir),
                    *give_back(),
                    MarkStoppedAfterFailure(),
                ],
            )
        case RestartRequest():
            # The claim (GPUs included) stays with the machine across its own restart.
            return Plan(
                "restart",
                [
                    Transition("mark_stopping", S.STOPPING, "restart"),
                    *halt(requested=True, timeout_s=request.timeout_s, signum=request.signal),
                    *boot(fresh_image=False),
                ],
                launch_rollback,
            )
        case UpdateRequest():
            steps: list[Step] = []
            if request.relaunch:
                steps.append(Transition("mark_replacing", S.REPLACING, "update"))
            steps += [
                *halt(requested=True),
                *give_back(),
                ApplyConfig(
                    request.config, request.version, request.instance_id, request.metadata_before
                ),
            ]
            if request.relaunch:
                steps += boot(fresh_image=True)
            else:
                steps.append(StopIfSuspended(host))
            return Plan("update", steps, launch_rollback)
        case SuspendRequest():
            # The claim and the tap go back: a suspended machine holds no host resources,
            # and is placed again when it is started. Its volumes stay attached: the saved
            # guest has them mounted (stop, update and destroy detach them); a sandbox's are
            # unmounted from the host, and mounted again before it is restored.
            return Plan(
                "suspend",
                [
                    Transition("mark_suspending", S.SUSPENDING, "suspend"),
                    SuspendVm(host),
                    ForgetVm(host),
                    UnmountVolumes(host),
                    DetachNetwork(host),
                    ReleaseClaim(host),
                    Transition("mark_suspended", S.SUSPENDED, "suspend"),
                ],
                [
                    ForgetVm(host),
                    DetachNetwork(host, unless_vm_recorded=True),
                    ReleaseClaim(host, unless_vm_recorded=True),
                    SettleSuspend(host),
                ],
            )
        case ExitRequest():
            return Plan(
                "exit",
                [
                    RecordExit(host.platform, requested=False),
                    CollectGpuXids(host, run_dir),
                    ReleaseVm(host),
                    UnmountVolumes(host),
                    Transition("mark_stopped", S.STOPPED, "stop"),
                    ApplyRestartPolicy(),
                    *give_back(keep_if_restarting=True),
                ],
                [
                    ReleaseVm(host),
                    UnmountVolumes(host),
                    CollectGpuXids(host, run_dir),
                    *give_back(),
                    MarkStoppedAfterFailure(),
                ],
            )
        case DestroyRequest():
            return Plan(
                "destroy",
                [
                    Transition("mark_destroying", S.DESTROYING, "destroy"),
                    *halt(requested=True, timeout_s=0.0 if request.force else None),
                    *give_back(),
                    RemoveRunDir(run_dir),
                    DropLease(),
                    Transition("mark_destroyed", S.DESTROYED, "destroy"),
                ],
                [
                    ReleaseVm(host),
                    UnmountVolumes(host),
                    CollectGpuXids(host, run_dir),
                    *give_back(),
                    RemoveRunDir(run_dir),
                    DropLease(),
                    Transition("mark_destroyed", S.DESTROYED, "destroy"),
                ],
            )
    raise ValueError(f"no plan for {request!r}")


def _handoff(request: HandoffRequest, host: HostServices) -> Plan:
    """The handoff of the IOMMU group of ``request.bdf`` (its first GPU)."""
    return Plan("handoff", handoff_steps(host, request.bdf), [QuarantineGroup(host, request.bdf)])


def _volume(request: VolumeRequest, subject: str, host: HostServices) -> Plan:
    """A volume's operation: the library's steps, with the record's changes around them."""
    volume_id = volume_of(subject)
    library = library_plan(host_volumes(host), request, volume_id)

    def image_steps(steps: tuple[VolumeStep, ...]) -> list[Step]:
        return [ImageStep(host, request, volume_id, step.name) for step in steps]

    steps, rollback = image_steps(library.steps), image_steps(library.rollback)
    match request:
        case VolumeCreateRequest():
            steps.append(
                MoveVolume(host, volume_id, "mark_volume_created", VolumeState.CREATED, BEING_MADE)
            )
            rollback.append(
                MoveVolume(
                    host,
                    volume_id,
                    "mark_volume_destroyed",
                    VolumeState.DESTROYED,
                    BEING_MADE,
                    with_reason=True,
                )
            )
        case VolumeExtendRequest():
            steps.append(RecordVolumeSize(host, volume_id, request.size_gb))
        case VolumeSnapshotRequest():
            steps.append(RecordSnapshot(host, volume_id, request.snapshot_id, request.scheduled))
        case VolumeDeleteSnapshotRequest():
            steps.append(ForgetSnapshot(host, volume_id, request.snapshot_id))
        case VolumeDeleteRequest():
            steps.insert(
                0,
                MoveVolume(
                    host,
                    volume_id,
                    "mark_volume_destroying",
                    VolumeState.DESTROYING,
                    frozenset({VolumeState.CREATED, VolumeState.FAILED}),
                    detached_only=True,
                ),
            )
            steps.append(
                MoveVolume(
                    host,
                    volume_id,
                    "mark_volume_destroyed",
                    VolumeState.DESTROYED,
                    frozenset({VolumeState.DESTROYING}),
                )
            )
            rollback.append(RestoreVolume(host, volume_id))
    return Plan(request.operation, steps, rollback)
