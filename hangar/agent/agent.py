"""The host agent: executes durable runs, watches running guests, reconciles on start.

The API submits runs; the agent executes them one machine at a time, in submission order.
A force-destroy cancels what the machine was doing (a pull stuck on a slow registry, a
boot): the run in progress rolls back, the ones queued behind it are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from hangar.agent.context import StepContext
from hangar.agent.engine import CrashHook, RetryPolicy, RunEngine, RunObserver, no_crash
from hangar.agent.gpu_steps import handoff_subject, operator_release, submit_handoffs
from hangar.agent.host import HostServices
from hangar.agent.metering import UsageMeter
from hangar.agent.operations import plan_for
from hangar.agent.platform import GuestPlatform
from hangar.agent.slices import shared_gpus
from hangar.agent.steps import boot_files_exist, new_run, unlink_boot_files
from hangar.agent.volume_watch import VolumeWatch
from hangar.clock import Clock
from hangar.errors import HangarError, NotFound, PreconditionFailed
from hangar.model.gpu import GpuState
from hangar.model.machine import Machine, MachineState, host_event
from hangar.model.run import ExitRequest, RunRecord, RunRequest, RunStatus
from hangar.scheduler import Gpu
from hangar.store.protocol import MachineStore, RunStore
from hangar.vmm.snapshot import drop_snapshot, has_snapshot

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.25
NOT_CANCELLED_BY_DESTROY = frozenset({"destroy", "handoff", "exit"})


class Agent:
    def __init__(
        self,
        machines: MachineStore,
        runs: RunStore,
        host: HostServices,
        clock: Clock,
        crash_hook: CrashHook = no_crash,
        retry: RetryPolicy | None = None,
        meter: UsageMeter | None = None,
        observers: Sequence[RunObserver] = (),
        on_repair: Callable[[str, str], None] | None = None,
    ) -> None:
        """``meter`` writes usage (it observes the runs, checkpoints in the monitor loop and
        recovers at start); ``observers`` are told of every step (metrics); ``on_repair``
        is told of each repair reconciliation makes (what, on which machine), for the
        operator's audit log."""
        self._on_repair = on_repair
        self.machines = machines
        self.runs = runs
        self.host = host
        self.clock = clock
        self.meter = meter
        everyone = (*observers, *((meter,) if meter is not None else ()))
        self.engine = RunEngine(lambda run: plan_for(run, host), crash_hook, retry, everyone)
        self._machine_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._monitor_task: asyncio.Task[None] | None = None
        self._current: dict[str, tuple[RunRecord, asyncio.Task[RunRecord]]] = {}
        self._cancel_reasons: dict[str, str] = {}
        """run id -> why it was cancelled (a force-destroy)"""
        self._listeners: list[Callable[[str | None], None]] = []
        self.volume_watch = (
            VolumeWatch(
                host.volumes,
                machines,
                runs,
                host.platform,
                clock,
                self.submit,
                self.has_unfinished_run,
                self.notify,
            )
            if host.volumes is not None
            else None
        )

    @property
    def platform(self) -> GuestPlatform:
        return self.host.platform

    @property
    def machines_dir(self) -> Path:
        return self.host.machines_dir

    # lifecycle
    async def start(self) -> None:
        self.machines_dir.mkdir(parents=True, exist_ok=True)
        self.register_host()
        if self.meter is not None:
            self.meter.recover()
        await self.reconcile()
        self._monitor_task = asyncio.create_task(self._monitor_loop())

    async def close(self) -> None:
        if self.host.network is not None:
            await self.host.network.close()
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.meter is not None:
            try:
                self.meter.checkpoint()
            except Exception:
                log.exception("last usage checkpoint failed")

    def register_host(self) -> None:
        """This host's GPUs into its GPU store, and its capacity, GPUs (with their IOMMU
        groups) and Fabric Manager partitions into its claim record (claims and GPU states it
        had are kept)."""
        devices = self.host.gpus
        partitions = None
        if devices is not None:
            inventory = devices.inventory()
            devices.register(self.host.gpu_store, inventory)
            partitions = devices.fabric_partitions(inventory)
        host_id = self.host.placement.host.id
        self.host.placement.register(
            self.host.gpu_store.list_gpus(host_id=host_id), fabric_partitions=partitions
        )

    # change notification, for `wait`, the DNS service and whoever watches machines
    def notify(self, machine_id: str | None = None) -> None:
        """Something changed: machine ``machine_id`` (its record is read again, alone), or
        anything (None: everything is read again)."""
        if machine_id is None:
            self._refresh_dns()
        else:
            self._refresh_dns_of(machine_id)
        for listener in list(self._listeners):
            listener(machine_id)
        loop_task = asyncio.get_running_loop().create_task(self._notify_waiters())
        self._tasks.add(loop_task)
        loop_task.add_done_callback(self._tasks.discard)

    async def _notify_waiters(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def on_change(self, listener: Callable[[str | None], None]) -> Callable[[], None]:
        """Call ``listener`` (cheap, no I/O) after every change, with the id of the machine
        that changed (None: any may have); returns how to stop."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _refresh_dns(self) -> None:
        network = self.host.network
        if network is None or network.dns is None:
            return
        app_orgs = {app.name: app.org_slug for app in self.machines.list_apps(None)}
        network.refresh_dns(app_orgs, self.machines.list_machines(None))

    def _refresh_dns_of(self, machine_id: str) -> None:
        network = self.host.network
        if network is None or network.dns is None:
            return
        machine = self.machines.get_machine(machine_id)
        app = self.machines.get_app(machine.app) if machine is not None else None
        network.refresh_dns_of(machine_id, machine, app.org_slug if app is not None else None)

    async def wait_for_change(self, timeout_s: float) -> None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)

    # runs
    def submit(self, run: RunRecord) -> bool:
        """Record a run durably, then drive its machine's queue. False: that run id exists."""
        inserted = self.runs.insert_run(run)
        self._drive(run.machine_id)
        return inserted

    def submit_operation(
        self, machine_id: str, request: RunRequest, run_id: str | None = None
    ) -> RunRecord:
        """Submit ``request`` on ``machine_id`` (a machine, or a ``vol:``/``gpu:`` subject);
        with ``run_id``, a repeated submit adds no second run."""
        run = new_run(machine_id, request, self.clock.now(), run_id=run_id)
        self.submit(run)
        return run

    def _drive(self, machine_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(machine_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, machine_id: str) -> None:
        lock = self._machine_locks.setdefault(machine_id, asyncio.Lock())
        async with lock:
            while True:
                pending = self.runs.list_runs(machine_id, unfinished_only=True)
                if not pending:
                    return
                run = pending[0]
                ctx = StepContext(
                    run=run,
                    machines=self.machines,
                    runs=self.runs,
                    clock=self.clock,
                    notify=partial(self.notify, run.machine_id),
                    submit=self.submit,
                )
                try:
                    await self._execute(machine_id, run, ctx)
                except Exception:
                    # A step's own failure rolls back inside the engine; reaching here means
                    # the store itself failed. Leave the run unfinished for the next restart.
                    log.exception("run %s could not be executed", run.id)
                    return
                self.notify(run.machine_id)

    async def _execute(self, machine_id: str, run: RunRecord, ctx: StepContext) -> None:
        """Execute ``run``; if it is cancelled on purpose (:meth:`cancel_for_destroy`), roll it
        back with the reason as its error."""
        task = asyncio.ensure_future(self.engine.execute(run, ctx))
        self._current[machine_id] = (run, task)
        try:
            await task
        except asyncio.CancelledError:
            reason = self._cancel_reasons.pop(run.id, None)
            this = asyncio.current_task()
            if reason is None or (this is not None and this.cancelling()):
                raise
            step = run.progress.current_step or "run"
            log.warning("run %s (%s) cancelled in %s: %s", run.id, run.operation, step, reason)
            run.status = RunStatus.ROLLING_BACK
            run.error = f"{step}: cancelled: {reason}"
            run.progress.current_step = ""
            run.updated_at = self.clock.now()
            self.runs.save_run(run)
            await self.engine.execute(run, ctx)
        finally:
            self._current.pop(machine_id, None)
            self._cancel_reasons.pop(run.id, None)

    def cancel_for_destroy(self, machine_id: str, reason: str) -> bool:
        """A force-destroy: drop the machine's queued runs (they have done nothing yet) and
        cancel the one in progress, which rolls back (freeing what it took) before the
        destroy runs. True if anything was cancelled."""
        current = self._current.get(machine_id)
        cancelled = False
        for run in self.runs.list_runs(machine_id, unfinished_only=True):
            if run.operation in NOT_CANCELLED_BY_DESTROY:
                continue
            if current is not None and run.id == current[0].id:
                continue
            if run.steps_done or run.status != RunStatus.RUNNING:
                continue
            run.status = RunStatus.FAILED
            run.error = f"cancelled: {reason}"
            run.updated_at = self.clock.now()
            self.runs.save_run(run)
            cancelled = True
        if current is not None:
            run, task = current
            if run.operation not in NOT_CANCELLED_BY_DESTROY and not task.done():
                self._cancel_reasons[run.id] = reason
                task.cancel()
                cancelled = True
        return cancelled

    def has_unfinished_run(self, machine_id: str) -> bool:
        return bool(self.runs.list_runs(machine_id, unfinished_only=True))

    # watching guests
    async def _monitor_loop(self) -> None:
        while True:
            try:
                await self.check_guests()
                if self.host.mps is not None:
                    await self.host.mps.supervise(lambda: shared_gpus(self.host))
                if self.volume_watch is not None:
                    await self.volume_watch.tick()
            except Exception:
                log.exception("guest monitor pass failed")
            if self.meter is not None:
                try:
                    self.meter.tick()
                except Exception:
                    log.exception("usage checkpoint failed")
            await self.clock.sleep(MONITOR_INTERVAL_S)

    async def check_guests(self) -> None:
        """Turn each guest that ended on its own into an ``exit`` run (once per boot)."""
        for machine_id, handle in self.runs.list_vm_handles().items():
            if self.has_unfinished_run(machine_id):
                continue
            if self.platform.running(handle):
                continue
            machine = self.machines.get_machine(machine_id)
            if machine is None or machine.state != MachineState.STARTED:
                continue
            run_id = f"exit.{machine_id}.{handle.get('pid')}.{handle.get('start_time')}"
            self.submit(new_run(machine_id, ExitRequest(), self.clock.now(), run_id=run_id))

    # reconciliation
    def _live(self, machine: Machine | None) -> bool:
        return machine is not None and (
            machine.state.holds_resources or self.has_unfinished_run(machine.id)
        )

    def _keeps_volumes(self, machine: Machine | None) -> bool:
        """A live machine keeps its volumes attached, and so does a suspended one (its saved
        guest has them mounted)."""
        return self._live(machine) or (
            machine is not None and machine.state is MachineState.SUSPENDED
        )

    async def reconcile(self) -> None:
        """After a (re)start: kill VMMs no record owns, drop files and claims no live machine
        owns, hand off GPUs left cleaning, resume runs."""
        handles = self.runs.list_vm_handles()
        for pid, machine_id in self.platform.vmm_processes(self.machines_dir).items():
            recorded = handles.get(machine_id)
            machine = self.machines.get_machine(machine_id)
            owned = (
                recorded is not None
                and recorded.get("pid") == pid
                and machine is not None
                and not machine.state.terminal
            )
            if not owned:
                log.warning("killing VMM pid %s of machine %s: no record owns it", pid, machine_id)
                self.platform.kill_process(pid)
                self._repaired("kill_unowned_vmm", machine_id)
        for machine_id, handle in handles.items():
            machine = self.machines.get_machine(machine_id)
            if machine is None or machine.state.terminal:
                await self.platform.kill(handle)
                self.runs.delete_vm_handle(machine_id)
                self._repaired("kill_vmm_of_gone_machine", machine_id)
            else:
                # Adopting a VM that still runs reads its console and control port again.
                await self.platform.alive(handle)
        await self._unmount_orphan_volumes()
        self._settle_suspended()
        self._remove_orphan_files()
        self._reconcile_claims()
        if self.volume_watch is not None:
            self.volume_watch.reconcile(
                lambda machine_id: self._keeps_volumes(self.machines.get_machine(machine_id))
            )
        if self.host.network is not None:
            owned = {
                machine.id
                for machine in self.machines.list_machines(None)
                if self._live(machine) and machine.host_id == self.host.placement.host.id
            }
            await self.host.network.start(owned)
            self._refresh_dns()
        for run in self.runs.list_runs(unfinished_only=True):
            log.info("resuming run %s (%s of %s)", run.id, run.operation, run.machine_id)
        for machine_id in {run.machine_id for run in self.runs.list_runs(unfinished_only=True)}:
            self._drive(machine_id)

    async def _unmount_orphan_volumes(self) -> None:
        """Volumes mounted on this host for a sandbox machine whose container is not
        recorded as running, and that no run is working on, are unmounted."""
        volumes = self.host.volumes
        if volumes is None:
            return
        handles = self.runs.list_vm_handles()
        owners = set(volumes.host.mounts.owners().values())
        for machine_id in sorted(owners):
            if machine_id in handles or self.has_unfinished_run(machine_id):
                continue
            log.warning("unmounting the volumes of %s: its container is gone", machine_id)
            try:
                await volumes.unmount_from_host(machine_id)
            except HangarError:
                log.exception("volumes of %s not unmounted", machine_id)
                continue
            self._repaired("unmount_orphan_volumes", machine_id)

    def _repaired(self, action: str, machine_id: str) -> None:
        if self._on_repair is None:
            return
        try:
            self._on_repair(action, machine_id)
        except Exception:
            log.exception("repair %s of %s not recorded", action, machine_id)

    def _reconcile_claims(self) -> None:
        """Release every claim no live machine holds (its GPUs go to a handoff), and give each
        GPU left ``cleaning`` a handoff run if it has none."""
        placement = self.host.placement
        for machine_id in placement.live_claims():
            if not self._live(self.machines.get_machine(machine_id)):
                log.warning("claim of %s is held by no live machine: releasing it", machine_id)
                released = placement.release(machine_id)
                self._repaired("release_stale_claim", machine_id)
                submit_handoffs(
                    self.host,
                    self.clock,
                    self.submit,
                    released,
                    f"claim of {machine_id} found stale at start",
                )
        for gpu in placement.gpus():
            group = placement.group_of(gpu.bdf)
            if (
                group[0].bdf == gpu.bdf
                and any(member.state is GpuState.CLEANING for member in group)
                and not self.has_unfinished_run(handoff_subject(gpu.bdf))
            ):
                self._start_handoff(gpu, "handoff resumed at start")

    def _start_handoff(self, gpu: Gpu, why: str) -> None:
        submit_handoffs(self.host, self.clock, self.submit, [gpu.bdf], why)

    def release_quarantine(self, bdf: str, actor: str, reason: str) -> Gpu:
        """An operator vouches for a quarantined GPU: its whole IOMMU group gets a fresh
        handoff (bound to vfio-pci again, scrubbed, checked) and is free only if that
        succeeds. Who did it is recorded."""
        gpu = self.host.placement.gpu(bdf)
        if gpu is None:
            raise NotFound(f"GPU {bdf} not found on this host", field="bdf")
        group = self.host.placement.group_of(bdf)
        if any(member.state is not GpuState.QUARANTINED for member in group):
            raise PreconditionFailed(f"GPU {bdf} is {gpu.state}, not quarantined", field="bdf")
        operator_release(self.host, bdf, actor, reason, self.clock.now())
        self.host.placement.set_gpu_state(bdf, GpuState.CLEANING, GpuState.QUARANTINED)
        self._start_handoff(group[0], f"quarantine released by {actor}: {reason}")
        released = self.host.placement.gpu(bdf)
        assert released is not None
        return released

    def _settle_suspended(self) -> None:
        """A suspended machine of this host whose snapshot is gone (removed by hand, or lost
        with its disk) can only boot cold: it is ``stopped``, with an event saying why."""
        host_id = self.host.placement.host.id
        for machine in self.machines.list_machines(None):
            if (
                machine.state is not MachineState.SUSPENDED
                or machine.host_id != host_id
                or self.has_unfinished_run(machine.id)
                or has_snapshot(self.host.suspend_state(machine.id))
            ):
                continue
            log.warning("machine %s is suspended but its snapshot is gone: stopped", machine.id)
            reason = "its suspend snapshot is gone: the next start boots it afresh"
            now = self.clock.now()
            self.machines.set_state(machine.id, MachineState.STOPPED, now, reason)
            self.machines.add_event(machine.id, host_event("stop", "stopped", now, reason=reason))

    def _remove_orphan_files(self) -> None:
        if not self.machines_dir.exists():
            return
        handles = self.runs.list_vm_handles()
        for run_dir in self.machines_dir.iterdir():
            machine = self.machines.get_machine(run_dir.name)
            if machine is None or machine.state.terminal:
                if not self.has_unfinished_run(run_dir.name):
                    log.warning("removing %s: no live machine owns it", run_dir.name)
                    shutil.rmtree(run_dir, ignore_errors=True)
                continue
            if run_dir.name in handles or self.has_unfinished_run(run_dir.name):
                continue
            if machine.state is MachineState.SUSPENDED:
                continue  # its boot files and snapshot are what it resumes from
            if drop_snapshot(self.host.suspend_state(machine.id)):
                log.warning(
                    "dropped the suspend snapshot of %s machine %s", machine.state, machine.id
                )
            if boot_files_exist(run_dir):
                log.warning("removing the boot files of stopped machine %s", run_dir.name)
                unlink_boot_files(run_dir)
