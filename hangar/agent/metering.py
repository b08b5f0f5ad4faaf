"""Metering: the agent writes how long each machine runs (and each volume exists), durably.

One usage interval per boot, named by the boot's VMM identity (machine, pid, process start
time), so every write can be repeated after a crash without counting twice:

- when ``launch_vm`` is done the interval opens (opening it again is a no-op);
- every ``checkpoint_s`` the agent moves ``until`` of the intervals of running guests to now,
  and opens one for any running guest that has none (a crash between launch and open);
- when ``release_vm`` is done the interval closes at that moment;
- at the agent's start (``recover``), an interval whose guest no longer runs closes at its
  last checkpoint: the time the agent could not see is not billed, so a crash loses at most
  one checkpoint period and never counts a second twice. A guest that kept running while the
  agent was down keeps its interval, and that time is counted once, at the next checkpoint.

Volumes are metered through :class:`VolumeUsageSource`: one interval per volume and size.
Until volumes have API records, the source is :class:`NoVolumeRecords`, which counts nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hangar.agent.host import HostServices
from hangar.agent.steps import LaunchVm, ReleaseVm
from hangar.clock import Clock
from hangar.model.host import HostInfo
from hangar.model.run import RunRecord
from hangar.model.usage import UsageInterval, UsageSubject
from hangar.scheduler import MILLI_PER_GPU
from hangar.store.protocol import MachineStore, RunStore
from hangar.store.usage import UsageStore

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_S = 10.0
LAUNCH_STEPS = frozenset({LaunchVm.name})
"""Steps after which a guest runs (a resume step belongs here once machines can suspend; a
step not listed is still caught by the next checkpoint)."""
RELEASE_STEPS = frozenset({ReleaseVm.name, f"rollback:{ReleaseVm.name}"})


@dataclass(frozen=True)
class VolumeUsage:
    """A volume that exists on this host, as metering needs it."""

    id: str
    org: str
    app: str
    size_gb: float


class VolumeUsageSource(Protocol):
    def volumes(self) -> Sequence[VolumeUsage]:
        """Every volume on this host now."""
        ...


class NoVolumeRecords:
    """Volumes have no API records yet: nothing to meter until they do."""

    def volumes(self) -> Sequence[VolumeUsage]:
        return ()


def boot_id(machine_id: str, handle: dict[str, Any]) -> str:
    """The usage interval of one boot: the VMM process's identity on this host."""
    return f"{machine_id}.{handle.get('pid')}.{handle.get('start_time')}"


def volume_interval_id(volume: VolumeUsage) -> str:
    return f"volume.{volume.id}.{volume.size_gb:g}"


class UsageMeter:
    """A run observer (opens and closes intervals as guests launch and are released) with
    the agent's periodic ``tick`` and the ``recover`` pass of its start."""

    def __init__(
        self,
        usage: UsageStore,
        machines: MachineStore,
        runs: RunStore,
        host: HostServices,
        clock: Clock,
        checkpoint_s: float = DEFAULT_CHECKPOINT_S,
        volumes: VolumeUsageSource | None = None,
    ) -> None:
        self.usage = usage
        self._machines = machines
        self._runs = runs
        self._host = host
        self._clock = clock
        self.checkpoint_s = checkpoint_s
        self._volumes = volumes or NoVolumeRecords()
        self._last_checkpoint: float | None = None

    @property
    def host_info(self) -> HostInfo:
        return self._host.placement.host

    # run observer
    def step_started(self, run: RunRecord, step: str) -> None:
        """Nothing to do when a step starts."""

    def step_retried(self, run: RunRecord, step: str, error: BaseException) -> None:
        """Nothing to do on a retry."""

    def run_finished(self, run: RunRecord) -> None:
        """Nothing to do when a run ends: intervals follow the guest, not the run."""

    def step_finished(
        self, run: RunRecord, step: str, ran: bool, seconds: float, error: BaseException | None
    ) -> None:
        if error is not None:
            return
        if step in LAUNCH_STEPS:
            self.machine_launched(run.machine_id)
        elif step in RELEASE_STEPS:
            self.machine_released(run.machine_id)

    # the guest's life
    def machine_launched(self, machine_id: str) -> None:
        handle = self._runs.get_vm_handle(machine_id)
        if handle is not None:
            self._open(machine_id, handle, self._clock.now())

    def machine_released(self, machine_id: str) -> None:
        now = self._clock.now()
        for interval in self.usage.open_intervals(self.host_info.id, machine_id=machine_id):
            if interval.subject is UsageSubject.MACHINE:
                self.usage.close_interval(interval.id, now)

    def _open(self, machine_id: str, handle: dict[str, Any], now: float) -> bool:
        interval = self._machine_interval(machine_id, handle, now)
        return interval is not None and self.usage.open_interval(interval)

    def _machine_interval(
        self, machine_id: str, handle: dict[str, Any], now: float
    ) -> UsageInterval | None:
        machine = self._machines.get_machine(machine_id)
        if machine is None:
            return None
        app = self._machines.get_app(machine.app)
        guest = machine.config.guest
        gpus, gpu_kind = 0.0, guest.gpu_kind or ""
        claim = self._host.placement.claim_of(machine_id)
        if claim is not None and claim.gpu_indexes:
            gpus = len(claim.gpu_indexes) * claim.gpu_milli / MILLI_PER_GPU
            if not gpu_kind:
                host_gpus = self._host.placement.gpus()
                gpu_kind = host_gpus[claim.gpu_indexes[0]].kind
        return UsageInterval(
            id=boot_id(machine_id, handle),
            subject=UsageSubject.MACHINE,
            org=app.org_slug if app is not None else "",
            app=machine.app,
            machine_id=machine_id,
            host=self.host_info.id,
            region=self.host_info.region,
            cpu_kind=guest.cpu_kind,
            cpus=guest.cpus,
            memory_mb=guest.memory_mb,
            gpu_kind=gpu_kind,
            gpus=gpus,
            started_at=now,
            until=now,
        )

    # the agent's start
    def recover(self) -> None:
        """Close every open interval whose guest is not running, at its last checkpoint."""
        handles = self._runs.list_vm_handles()
        for interval in self.usage.open_intervals(self.host_info.id):
            if interval.subject is not UsageSubject.MACHINE:
                continue
            handle = handles.get(interval.machine_id)
            running = (
                handle is not None
                and boot_id(interval.machine_id, handle) == interval.id
                and self._host.platform.running(handle)
            )
            if not running:
                log.info(
                    "usage of %s closed at its last checkpoint: its guest ended while the agent "
                    "was not watching",
                    interval.machine_id,
                )
                self.usage.close_interval(interval.id, None)

    # checkpoints
    def tick(self) -> None:
        """Called often (the agent's monitor loop); checkpoints every ``checkpoint_s``."""
        now = self._clock.monotonic()
        if self._last_checkpoint is not None and now - self._last_checkpoint < self.checkpoint_s:
            return
        self._last_checkpoint = now
        self.checkpoint()

    def checkpoint(self) -> None:
        """Write that every running guest (and every volume) is in use now."""
        now = self._clock.now()
        open_intervals = {i.id: i for i in self.usage.open_intervals(self.host_info.id)}
        in_use: list[str] = []
        handles = self._runs.list_vm_handles()
        for machine_id, handle in handles.items():
            if not self._host.platform.running(handle):
                continue
            interval_id = boot_id(machine_id, handle)
            if interval_id in open_intervals or self._open(machine_id, handle, now):
                in_use.append(interval_id)
        for volume in self._volumes.volumes():
            interval_id = volume_interval_id(volume)
            if interval_id in open_intervals or self.usage.open_interval(
                self._volume_interval(volume, now)
            ):
                in_use.append(interval_id)
        self.usage.checkpoint(in_use, now)
        current = set(in_use)
        for interval in open_intervals.values():
            if interval.id in current:
                continue
            if interval.subject is UsageSubject.VOLUME or interval.machine_id not in handles:
                # Gone without the agent closing it (deleted, resized, or released by a run
                # that crashed before telling us): end it at the last moment it was seen.
                self.usage.close_interval(interval.id, None)

    def _volume_interval(self, volume: VolumeUsage, now: float) -> UsageInterval:
        return UsageInterval(
            id=volume_interval_id(volume),
            subject=UsageSubject.VOLUME,
            org=volume.org,
            app=volume.app,
            volume_id=volume.id,
            host=self.host_info.id,
            region=self.host_info.region,
            volume_gb=volume.size_gb,
            started_at=now,
            until=now,
        )
