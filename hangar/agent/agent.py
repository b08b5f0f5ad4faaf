"""The host agent: executes durable runs, watches running guests, reconciles on start.

The API submits runs; the agent executes them one machine at a time, in submission order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from hangar.agent.context import StepContext
from hangar.agent.engine import CrashHook, RunEngine, no_crash
from hangar.agent.gpu_steps import handoff_subject, start_handoff
from hangar.agent.gpus import HostGpus
from hangar.agent.operations import PLANS
from hangar.agent.platform import GuestPlatform, RunDirLayout
from hangar.agent.steps import new_run
from hangar.clock import Clock
from hangar.errors import NotFound, PreconditionFailed
from hangar.model.gpu import GpuEvent, GpuRecord, GpuState
from hangar.model.machine import MachineState
from hangar.store.protocol import ClusterStore, RunRecord

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.25


class Agent:
    def __init__(
        self,
        store: ClusterStore,
        platform: GuestPlatform,
        clock: Clock,
        machines_dir: Path,
        gpus: HostGpus | None = None,
        crash_hook: CrashHook = no_crash,
    ) -> None:
        self.store = store
        self.platform = platform
        self.clock = clock
        self.machines_dir = machines_dir
        self.gpus = gpus
        self.engine = RunEngine(PLANS, crash_hook)
        self._machine_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self._monitor_task: asyncio.Task[None] | None = None

    # lifecycle
    async def start(self) -> None:
        self.machines_dir.mkdir(parents=True, exist_ok=True)
        await self.reconcile()
        self._monitor_task = asyncio.create_task(self._monitor_loop())

    async def close(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # change notification, for `wait`
    def notify(self) -> None:
        loop_task = asyncio.get_running_loop().create_task(self._notify_waiters())
        self._tasks.add(loop_task)
        loop_task.add_done_callback(self._tasks.discard)

    async def _notify_waiters(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_change(self, timeout_s: float) -> None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)

    # runs
    def submit(self, run: RunRecord) -> bool:
        """Record a run durably, then drive its machine's queue. False: that run id exists."""
        inserted = self.store.insert_run(run)
        self._drive(run.machine_id)
        return inserted

    def submit_operation(
        self, machine_id: str, operation: str, params: dict[str, object] | None = None
    ) -> RunRecord:
        run = new_run(machine_id, operation, self.clock.now(), dict(params or {}))
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
                pending = self.store.list_runs(machine_id, unfinished_only=True)
                if not pending:
                    return
                run = pending[0]
                ctx = StepContext(
                    run=run,
                    store=self.store,
                    clock=self.clock,
                    platform=self.platform,
                    machines_dir=self.machines_dir,
                    notify=self.notify,
                    submit=self.submit,
                    gpus=self.gpus,
                )
                try:
                    await self.engine.execute(run, ctx)
                except Exception:
                    # A step's own failure rolls back inside the engine; reaching here means
                    # the store itself failed. Leave the run unfinished for the next restart.
                    log.exception("run %s could not be executed", run.id)
                    return
                self.notify()

    def has_unfinished_run(self, machine_id: str) -> bool:
        return bool(self.store.list_runs(machine_id, unfinished_only=True))

    # watching guests
    async def _monitor_loop(self) -> None:
        while True:
            try:
                await self.check_guests()
            except Exception:
                log.exception("guest monitor pass failed")
            await self.clock.sleep(MONITOR_INTERVAL_S)

    async def check_guests(self) -> None:
        """Turn each guest that ended on its own into an ``exit`` run (once per boot)."""
        for machine_id, handle in self.store.list_vm_handles().items():
            if self.has_unfinished_run(machine_id):
                continue
            if self.platform.running(handle):
                continue
            machine = self.store.get_machine(machine_id)
            if machine is None or machine.state != MachineState.STARTED:
                continue
            run_id = f"exit.{machine_id}.{handle.get('pid')}.{handle.get('start_time')}"
            self.submit(new_run(machine_id, "exit", self.clock.now(), run_id=run_id))

    # reconciliation
    async def reconcile(self) -> None:
        """After a (re)start: kill VMMs no record owns, drop files no record owns, resume runs."""
        handles = self.store.list_vm_handles()
        for pid, machine_id in self.platform.vmm_processes(self.machines_dir).items():
            recorded = handles.get(machine_id)
            machine = self.store.get_machine(machine_id)
            owned = (
                recorded is not None
                and recorded.get("pid") == pid
                and machine is not None
                and machine.state != MachineState.DESTROYED
            )
            if not owned:
                log.warning("killing VMM pid %s of machine %s: no record owns it", pid, machine_id)
                self.platform.kill_process(pid)
        for machine_id, handle in handles.items():
            machine = self.store.get_machine(machine_id)
            if machine is None or machine.state == MachineState.DESTROYED:
                await self.platform.kill(handle)
                self.store.delete_vm_handle(machine_id)
        self._remove_orphan_files()
        self._reconcile_gpus()
        for run in self.store.list_runs(unfinished_only=True):
            log.info("resuming run %s (%s of %s)", run.id, run.operation, run.machine_id)
        for machine_id in {run.machine_id for run in self.store.list_runs(unfinished_only=True)}:
            self._drive(machine_id)

    def _reconcile_gpus(self) -> None:
        """Register this host's GPUs; send every GPU no live machine holds to a handoff."""
        if self.gpus is None:
            return
        self.gpus.register(self.store)
        for gpu in self.store.list_gpus(host_id=self.gpus.host_id):
            if gpu.state == GpuState.CLAIMED:
                machine = self.store.get_machine(gpu.machine_id)
                live = machine is not None and (
                    machine.state.holds_resources or self.has_unfinished_run(machine.id)
                )
                if not live:
                    log.warning("GPU %s is claimed by no live machine: handing it off", gpu.bdf)
                    self._start_handoff(gpu, f"claim of {gpu.machine_id} found stale at start")
            elif gpu.state == GpuState.CLEANING and not self.has_unfinished_run(
                handoff_subject(gpu.bdf)
            ):
                self._start_handoff(gpu, gpu.reason or "handoff resumed at start")

    def _start_handoff(self, gpu: GpuRecord, why: str) -> None:
        start_handoff(self.store, self.clock, self.submit, gpu, why)

    def release_quarantine(self, bdf: str, actor: str, reason: str) -> GpuRecord:
        """An operator vouches for a quarantined GPU: it gets a fresh handoff (reset and
        verify) and is free only if that succeeds. Who did it is recorded."""
        gpu = self.store.get_gpu(bdf)
        if gpu is None or self.gpus is None or gpu.host_id != self.gpus.host_id:
            raise NotFound(f"GPU {bdf} not found on this host", field="bdf")
        if gpu.state != GpuState.QUARANTINED:
            raise PreconditionFailed(f"GPU {bdf} is {gpu.state}, not quarantined", field="bdf")
        self.store.add_gpu_event(
            GpuEvent(
                bdf=bdf,
                timestamp=self.clock.now(),
                action="quarantine_released",
                actor=actor,
                detail={"reason": reason},
            )
        )
        self._start_handoff(gpu, f"quarantine released by {actor}: {reason}")
        released = self.store.get_gpu(bdf)
        assert released is not None
        return released

    def _remove_orphan_files(self) -> None:
        if not self.machines_dir.exists():
            return
        handles = self.store.list_vm_handles()
        for run_dir in self.machines_dir.iterdir():
            machine = self.store.get_machine(run_dir.name)
            if machine is None or machine.state == MachineState.DESTROYED:
                if not self.has_unfinished_run(run_dir.name):
                    log.warning("removing %s: no live machine owns it", run_dir.name)
                    shutil.rmtree(run_dir, ignore_errors=True)
                continue
            if run_dir.name in handles or self.has_unfinished_run(run_dir.name):
                continue
            for name in RunDirLayout.BOOT_FILES:
                leftover = run_dir / name
                if leftover.exists():
                    log.warning("removing %s of stopped machine %s", name, run_dir.name)
                    leftover.unlink()
