"""What the agent does for this host's volumes between runs, on its monitor's beat:

- **I/O errors.** A volume's disk stops the VM when a write fails for want of space (QEMU's
  ``werror=enospc``: nothing is lost, the VM is paused in state ``io-error``). The watch
  asks QEMU which volumes failed (``query-block``), records a ``volume`` event on the machine
  saying so (``describe_io_errors``), and once the host's disk has room again resumes the VM,
  which retries the write (another event). Other I/O errors are recorded, not resumed.
- **Daily snapshots.** Each volume's snapshot records and the injected clock decide
  (``decide_snapshots``) which snapshots are past the volume's ``snapshot_retention`` and
  whether the day's scheduled snapshot is due; each becomes a durable run of the volume
  (at most one attempt a day each: the run ids name the day).
- **Reconciliation.** At the agent's start (and with the schedule): an attachment whose
  machine is not live is let go, a create the API recorded but never submitted is run, and
  image and key files no record names are removed once past the grace period.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from hangar.agent.platform import GuestPlatform, VmHandleData
from hangar.agent.steps import new_run
from hangar.agent.volumes import HostVolumes
from hangar.clock import Clock
from hangar.errors import HangarError
from hangar.model.machine import MachineState, host_event
from hangar.model.run import (
    VOLUME_SUBJECT_PREFIX,
    RunRecord,
    VolumeCreateRequest,
    VolumeDeleteSnapshotRequest,
    VolumeSnapshotRequest,
    volume_subject,
)
from hangar.model.volume import Volume, VolumeState
from hangar.store.protocol import MachineStore, RunStore
from hangar.store.volume_claims import detach_volume
from hangar.volumes import (
    ReconcileReport,
    SnapshotInfo,
    decide_snapshots,
    describe_io_errors,
    new_snapshot_id,
    resume_vm,
    volume_io_errors,
)
from hangar.volumes.model import MAX_SNAPSHOTS_PER_VOLUME
from hangar.volumes.schedule import DAY_S

log = logging.getLogger(__name__)

IO_CHECK_INTERVAL_S = 2.0
SCHEDULE_INTERVAL_S = 300.0
RESUME_INTERVAL_S = 10.0
"""A VM paused on a full disk is resumed at most this often (it pauses again, with one
more event, if the disk is still full)."""
RESUME_FREE_BYTES = 64 << 20
"""Free space on the host's disk before a VM paused on it is resumed."""
VOLUME_EVENT = "volume"


@dataclass
class PausedVm:
    errors: dict[str, str]
    resumed_at: float | None = None


@dataclass
class VolumeWatch:
    volumes: HostVolumes
    machines: MachineStore
    runs: RunStore
    platform: GuestPlatform
    clock: Clock
    submit: Callable[[RunRecord], bool]
    has_unfinished_run: Callable[[str], bool]
    notify: Callable[[str | None], None] = lambda _machine_id: None
    _io_checked_at: float | None = None
    _scheduled_at: float | None = None
    """The first schedule pass comes one interval after the start (which reconciles)."""
    _reported: dict[str, PausedVm] = field(default_factory=dict)
    """Per boot (machine id, pid, start time): the errors last reported."""

    async def tick(self) -> None:
        """One beat of the agent's monitor: each duty when its interval has passed."""
        now = self.clock.monotonic()
        if self._io_checked_at is None or now - self._io_checked_at >= IO_CHECK_INTERVAL_S:
            self._io_checked_at = now
            await self.check_io_errors()
        if self._scheduled_at is None:
            self._scheduled_at = now
        elif now - self._scheduled_at >= SCHEDULE_INTERVAL_S:
            self._scheduled_at = now
            self.maintain_snapshots()
            self.sweep_files()

    # ---- I/O errors --------------------------------------------------------------------

    async def check_io_errors(self) -> None:
        seen: set[str] = set()
        for machine_id, handle in self.runs.list_vm_handles().items():
            machine = self.machines.get_machine(machine_id)
            if machine is None or machine.state is not MachineState.STARTED:
                continue
            if not machine.config.mounts or self.has_unfinished_run(machine_id):
                continue
            boot = f"{machine_id}.{handle.get('pid')}.{handle.get('start_time')}"
            seen.add(boot)
            await self._check_vm(machine_id, boot, handle)
        for boot in set(self._reported) - seen:
            del self._reported[boot]

    async def _check_vm(self, machine_id: str, boot: str, handle: VmHandleData) -> None:
        qmp = self.platform.qmp_socket(handle)
        if qmp is None or not self.platform.running(handle):
            return
        try:
            errors = await volume_io_errors(qmp, clock=self.clock)
        except HangarError as error:
            log.debug("machine %s: query-block failed: %s", machine_id, error)
            return
        paused = self._reported.get(boot)
        if not errors:
            self._reported.pop(boot, None)
            return
        if paused is None or paused.errors != errors:
            paused = PausedVm(errors)
            self._reported[boot] = paused
            self._event(machine_id, "io_error", errors)
        if set(errors.values()) != {"nospace"}:
            return
        now = self.clock.monotonic()
        if paused.resumed_at is not None and now - paused.resumed_at < RESUME_INTERVAL_S:
            return
        if self.volumes.host.free_bytes() < RESUME_FREE_BYTES:
            return
        paused.resumed_at = now
        try:
            await resume_vm(qmp, clock=self.clock)
        except HangarError as error:
            log.warning("machine %s: cannot resume after a full disk: %s", machine_id, error)
            return
        paused.errors = {}
        self._event(machine_id, "resumed", errors)

    def _event(self, machine_id: str, status: str, errors: dict[str, str]) -> None:
        message = describe_io_errors(errors)
        if status == "resumed":
            message = "the host's disk has room again; the machine goes on"
        log.warning("machine %s: %s", machine_id, message)
        # Fly's events carry ``request`` only on exits: the volumes are named in the reason.
        self.machines.add_event(
            machine_id, host_event(VOLUME_EVENT, status, self.clock.now(), reason=message)
        )
        self.notify(machine_id)

    # ---- daily snapshots ---------------------------------------------------------------

    def maintain_snapshots(self) -> list[RunRecord]:
        """Submit the runs the schedule calls for now; returns those submitted."""
        now = self.clock.now()
        day = int(now // DAY_S)
        submitted: list[RunRecord] = []
        for volume in self.volumes.store.list_volumes(host_id=self.volumes.host_id):
            subject = volume_subject(volume.id)
            if volume.state is not VolumeState.CREATED or self.has_unfinished_run(subject):
                continue
            decision = decide_snapshots(
                [SnapshotInfo(id=s.id, created_at=s.created_at) for s in volume.snapshots],
                {s.id for s in volume.snapshots if s.scheduled},
                volume.snapshot_retention,
                now,
            )
            runs = [
                new_run(
                    subject,
                    VolumeDeleteSnapshotRequest(snapshot_id=snapshot_id),
                    now,
                    run_id=f"{subject}.expire.{snapshot_id}.{day}",
                )
                for snapshot_id in decision.expire
            ]
            room = len(volume.snapshots) - len(decision.expire) < MAX_SNAPSHOTS_PER_VOLUME
            if decision.take and volume.auto_backup_enabled and room:
                request = VolumeSnapshotRequest(snapshot_id=new_snapshot_id(), scheduled=True)
                runs.append(new_run(subject, request, now, run_id=f"{subject}.daily.{day}"))
            submitted += [run for run in runs if self.submit(run)]
        return submitted

    # ---- reconciliation ----------------------------------------------------------------

    def reconcile(self, machine_live: Callable[[str], bool]) -> ReconcileReport:
        now = self.clock.now()
        for volume in self.volumes.store.list_volumes(host_id=self.volumes.host_id):
            holder = volume.attached_machine_id
            if holder is not None and not machine_live(holder):
                log.warning("volume %s: machine %s is not live; detaching", volume.id, holder)
                detach_volume(self.volumes.store, volume.id, holder, now)
            subject = volume_subject(volume.id)
            if volume.state.being_made and not self.has_unfinished_run(subject):
                log.warning("volume %s was recorded but never made; making it", volume.id)
                self.submit(new_run(subject, create_request(volume), now))
        return self.sweep_files()

    def sweep_files(self) -> ReconcileReport:
        """Remove image and key files no volume record on this host names (past the grace
        period); a file of a record or of a volume with a run in progress is never touched."""
        owned = {v.id for v in self.volumes.store.list_volumes(host_id=self.volumes.host_id)}
        owned |= {
            run.machine_id.removeprefix(VOLUME_SUBJECT_PREFIX)
            for run in self.runs.list_runs(unfinished_only=True)
            if run.machine_id.startswith(VOLUME_SUBJECT_PREFIX)
        }
        report = self.volumes.host.reconcile(owned)
        for path in report.removed:
            log.warning("removed %s: no volume record owns it", path.name)
        return report


def create_request(volume: Volume) -> VolumeCreateRequest:
    """The create run of a volume, from its record."""
    return VolumeCreateRequest(
        size_gb=volume.size_gb,
        encrypted=volume.encrypted,
        source_volume_id=volume.source_volume_id,
        snapshot_id=volume.snapshot_id,
    )
