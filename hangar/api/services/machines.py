"""Machines: the Machines API's verbs, validated, turned into durable agent runs; and what is
asked of a running guest (exec, ps, signal, its console) through the agent's platform, or, in a
fleet's API replica, of the machine's host through the relay (``remote``)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from hangar.agent.agent import Agent
from hangar.agent.platform import VmHandleData
from hangar.api.console import ConsoleReaders, FollowerSlot
from hangar.api.schemas import (
    DEFAULT_LEASE_TTL_S,
    CreateMachineRequest,
    ExecRequest,
    ExecResponse,
    LeaseData,
    LeaseRequest,
    LeaseView,
    MachinePage,
    MachineVersionView,
    MachineView,
    ProcessStat,
    StartResponse,
    StopRequest,
    UpdateMachineRequest,
    WaitResponse,
    iso8601,
)
from hangar.api.services.addresses import PrivateAddresses
from hangar.api.services.image_policy import ImagePolicy
from hangar.api.services.placement import MachinePlacer
from hangar.api.services.platform import PlatformService
from hangar.api.services.quotas import QuotaService
from hangar.api.services.remote import RemoteGuests
from hangar.api.services.volumes import VolumeService
from hangar.clock import Clock
from hangar.errors import (
    Conflict,
    HangarError,
    InsufficientCapacity,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    RequestTooLarge,
    ServiceUnavailable,
    Unprocessable,
    WaitTimeout,
)
from hangar.model.config import MachineConfig, signal_number, validate_metadata_key
from hangar.model.duration import parse_duration
from hangar.model.guest_contract import RunDir
from hangar.model.host import HostInfo
from hangar.model.machine import (
    STOPPABLE_STATES,
    WAITABLE_STATES,
    Lease,
    Machine,
    MachineEvent,
    MachineState,
    new_machine_id,
    new_ulid,
    user_event,
)
from hangar.model.run import (
    CreateRequest,
    DestroyRequest,
    PrepareRequest,
    RestartRequest,
    RunRecord,
    StartRequest,
    SuspendRequest,
    UpdateRequest,
)
from hangar.model.run import StopRequest as StopRun
from hangar.store.protocol import MachineStore, RunStore, SecretStore
from hangar.vmm.errors import GuestExecError, SignalNotDelivered, SuspendNotSupported
from hangar.vmm.guest_exec import GuestProcess

WAIT_STATES = frozenset(str(state) for state in WAITABLE_STATES)
MAX_WAIT_S = 60
WAIT_EVENTS_SCANNED = 100
PROCESS_SORT_KEYS = ("pid", "rss", "cpu", "stime", "rtime", "command", "directory")


def wait_timeout_s(value: str | None) -> int:
    """``wait``'s ``timeout``: whole seconds (as flaps sends it) or a Go duration, 1..60."""
    if value is None or value == "":
        return MAX_WAIT_S
    text = value.strip()
    try:
        seconds = float(text) if text.isdigit() else parse_duration(text)
    except ValueError as error:
        raise InvalidRequest(f"timeout: {error}", field="timeout") from None
    if not 1 <= seconds <= MAX_WAIT_S:
        raise InvalidRequest(f"timeout must be between 1 and {MAX_WAIT_S} s", field="timeout")
    return int(seconds)


def wanted_states(values: Sequence[str]) -> frozenset[str]:
    """``state`` given once or more (or comma-separated): any of them will do."""
    if isinstance(values, str):  # a str is a Sequence of letters: a caller's mistake
        raise TypeError(f"states is a list of states, not the string {values!r}")
    wanted = {part.strip() for value in values for part in value.split(",") if part.strip()}
    unknown = wanted - WAIT_STATES
    if unknown:
        raise InvalidRequest(
            f"state must be one of {sorted(WAIT_STATES)}, not {sorted(unknown)[0]!r}",
            field="state",
        )
    return frozenset(wanted or {"started"})


def process_stat(process: GuestProcess) -> ProcessStat:
    return ProcessStat(
        pid=process.pid,
        stime=int(process.started_after_boot_s),
        rtime=int(process.cpu_time_s * 1000),
        command=process.command,
        directory=process.directory,
        cpu=int(process.cpu_time_s),
        rss=process.rss_bytes,
        ppid=process.ppid,
        user=process.user,
        state=process.state,
        argv=process.argv,
    )


class MachineService:
    def __init__(
        self,
        store: MachineStore,
        runs: RunStore,
        agent: Agent,
        clock: Clock,
        host: HostInfo,
        quotas: QuotaService,
        images: ImagePolicy,
        platform: PlatformService,
        max_config_bytes: int | None = None,
        console: ConsoleReaders | None = None,
        addresses: PrivateAddresses | None = None,
        secrets: SecretStore | None = None,
        volumes: VolumeService | None = None,
        placer: MachinePlacer | None = None,
        remote: RemoteGuests | None = None,
    ) -> None:
        """``max_config_bytes``: the largest config (as JSON) a machine may have;
        ``console``: how machines' consoles are read and followed; ``placer``: a fleet's
        scheduler choosing each new machine's host (None: this server's one host takes every
        machine); ``remote``: where guests run on other hosts (an API replica's relay)."""
        self._remote = remote
        self._max_config_bytes = max_config_bytes
        self.console_readers = console or ConsoleReaders(clock)
        self._placer = placer
        self._addresses = addresses
        self._volumes = volumes
        self._platform = platform
        self._store = store
        self._runs = runs
        self._agent = agent
        self._clock = clock
        self._host = host
        self._quotas = quotas
        self._images = images
        self._secrets = secrets

    # reading
    def require(self, app: str, machine_id: str, include_destroyed: bool = True) -> Machine:
        machine = self._store.get_machine(machine_id)
        if machine is None or machine.app != app or not self._of_current_app(machine):
            raise NotFound(f"machine {machine_id} not found in app {app}", machine_id=machine_id)
        if not include_destroyed and machine.state == MachineState.DESTROYED:
            raise NotFound(f"machine {machine_id} is destroyed", machine_id=machine_id)
        return machine

    def _of_current_app(self, machine: Machine) -> bool:
        """A machine of an earlier app of the same name is not this app's."""
        current = self._store.get_app(machine.app)
        return current is not None and machine.app_id in ("", current.id)

    def view(
        self, machine: Machine, event_limit: int = 10, nonce: str | None = None
    ) -> MachineView:
        events = self._store.list_events(machine.id, event_limit) if event_limit else []
        view = MachineView.of(machine, events, nonce)
        if self._placer is not None:
            view.host_status = self._placer.host_status(machine.host_id)
            if view.host_status != "ok":
                view.incomplete_config = view.config
        return view

    def list_views(
        self,
        app: str,
        include_deleted: bool,
        state: str | None,
        region: str | None,
        metadata: dict[str, str],
        page: MachinePage | None = None,
    ) -> tuple[list[MachineView], str | None]:
        """The app's machines that match, oldest first: all of them, or with ``page`` at
        most ``page.limit`` after ``page.after``. Also the id to pass as ``after`` for the
        next page (None: nothing follows)."""
        wanted_states = set(state.split(",")) if state else None

        def matches(machine: Machine) -> bool:
            if wanted_states and str(machine.state) not in wanted_states:
                return False
            if region and machine.region != region:
                return False
            return all(machine.config.metadata.get(k) == v for k, v in metadata.items())

        if page is None:
            machines = self._store.list_machines(app, include_destroyed=include_deleted)
            return [self.view(m, event_limit=0) for m in machines if matches(m)], None
        if page.after is not None:
            self.require_cursor(app, page.after)
        found: list[Machine] = []
        after = page.after
        # Filters apply to what the store returns, so read on until the page is full (one
        # machine more tells whether another page follows) or the app has no more.
        while len(found) <= page.limit:
            chunk = self._store.list_machines(
                app, include_destroyed=include_deleted, limit=page.limit + 1, after=after
            )
            found += [machine for machine in chunk if matches(machine)]
            if len(chunk) <= page.limit:
                break
            after = chunk[-1].id
        views = [self.view(machine, event_limit=0) for machine in found[: page.limit]]
        return views, views[-1].id if len(found) > page.limit else None

    def require_cursor(self, app: str, machine_id: str) -> None:
        """``after`` must name a machine of the app (one from a page it was given)."""
        machine = self._store.get_machine(machine_id)
        if machine is None or machine.app != app:
            raise Unprocessable(
                f"after: {machine_id!r} is not a machine of app {app}", field="after"
            )

    def events(self, app: str, machine_id: str, limit: int | None) -> list[MachineEvent]:
        self.require(app, machine_id)
        return self._store.list_events(machine_id, limit)

    def runs(self, app: str, machine_id: str) -> list[RunRecord]:
        self.require(app, machine_id)
        return self._runs.list_runs(machine_id)

    def versions(self, app: str, machine_id: str) -> list[MachineVersionView]:
        """The machine's config versions, newest first (``GET .../versions``)."""
        self.require(app, machine_id)
        return [
            MachineVersionView(
                version=str(row["version"]),
                user_config=row["config"].model_dump(mode="json", exclude_none=True),
                created_at=iso8601(row["created_at"]),
                replaced_at=iso8601(row["replaced_at"]) if row["replaced_at"] else None,
            )
            for row in reversed(self._store.list_config_versions(machine_id))
        ]

    def console_log_path(self, app: str, machine_id: str) -> Path:
        self.require(app, machine_id)
        return self._agent.machines_dir / machine_id / RunDir.CONSOLE_LOG

    async def console(
        self, app: str, machine_id: str, follow: bool
    ) -> tuple[AsyncIterator[bytes], FollowerSlot | None]:
        """The machine's console as a stream of chunks; ``follow``: and what comes next, while
        the machine runs or has an operation pending (a follower's slot is taken now: 429 if
        the machine has all it may have)."""
        if self._remote is not None:
            return await self._remote.console(self.require(app, machine_id), follow), None
        path = self.console_log_path(app, machine_id)
        if not follow:
            return self.console_readers.read(path), None

        def still_logging() -> bool:
            machine = self._store.get_machine(machine_id)
            if machine is None:
                return False
            return machine.state.holds_resources or self.busy(machine_id)

        slot = self.console_readers.take(machine_id)
        return self.console_readers.follow(path, still_logging, slot), slot

    # validation shared by create and update
    def _check_config_size(self, config: MachineConfig) -> None:
        if self._max_config_bytes is None:
            return
        size = len(config.model_dump_json().encode())
        if size > self._max_config_bytes:
            raise Unprocessable(
                f"config: {size} bytes as JSON, more than the {self._max_config_bytes} a "
                "machine's config may have",
                field="config",
                limit=self._max_config_bytes,
            )

    def _check_placement(self, region: str | None, config: MachineConfig) -> str:
        if self._placer is not None:  # a fleet: the scheduler decides (at create)
            return region or ""
        if region and region != self._host.region:
            raise InsufficientCapacity(
                f"insufficient capacity: no host in region {region}", field="region", region=region
            )
        if config.guest.cpus > self._host.cpus:
            raise InsufficientCapacity(
                f"config.guest.cpus: {config.guest.cpus} CPUs requested, "
                f"host {self._host.id} has {self._host.cpus}",
                field="config.guest.cpus",
            )
        if config.guest.memory_mb > self._host.allocatable_memory_mb:
            raise InsufficientCapacity(
                f"config.guest.memory_mb: {config.guest.memory_mb} MB requested, "
                f"host {self._host.id} can allocate {self._host.allocatable_memory_mb} MB",
                field="config.guest.memory_mb",
            )
        return self._host.region

    def _check_secrets(self, app: str, request: CreateMachineRequest) -> None:
        """``min_secrets_version``: the app's secrets must have reached it; and every secret a
        file names must exist (its value is read only at boot)."""
        if self._secrets is None:
            return
        wanted = request.min_secrets_version
        if wanted is not None and self._secrets.secrets_version(app) < wanted:
            raise PreconditionFailed(
                f"min_secrets_version: app {app}'s secrets are at version "
                f"{self._secrets.secrets_version(app)}, not yet {wanted}",
                field="min_secrets_version",
            )
        named = {f.secret_name for f in request.config.files if f.secret_name is not None}
        missing = named - {record.name for record in self._secrets.list_secrets(app)}
        if missing:
            raise Unprocessable(
                f"config.files: app {app} has no secret named {sorted(missing)[0]}",
                field="config.files.secret_name",
            )

    def _check_mounts(
        self,
        app: str,
        config: MachineConfig,
        region: str,
        machine: Machine | None = None,
        running: bool = False,
    ) -> str | None:
        """``config.mounts``: the volumes exist in this app and region, no other machine has
        them; returns the host they are on (the machine must run there)."""
        if not config.mounts and (machine is None or not machine.config.mounts):
            return None
        if self._volumes is None:
            raise Unprocessable(
                "config.mounts: this server keeps no volumes", field="config.mounts"
            )
        return self._volumes.check_mounts(app, config, region, machine, running)

    def _check_lease(self, machine: Machine, nonce: str | None) -> None:
        lease = self._store.get_lease(machine.id)
        if lease is None or lease.expires_at <= self._clock.now():
            return
        if nonce != lease.nonce:
            raise Conflict(
                f"machine {machine.id} is leased; pass its nonce in fly-machine-lease-nonce",
                field="fly-machine-lease-nonce",
            )

    def _record(self, machine_id: str, event_type: str, status: str, reason: str = "") -> None:
        """An event of what a request asked (``source: user``)."""
        self._store.add_event(
            machine_id, user_event(event_type, status, self._clock.now(), reason=reason)
        )

    def _ready_for(
        self,
        app: str,
        machine_id: str,
        nonce: str | None,
        verb: str,
        allowed: Callable[[MachineState], bool],
    ) -> Machine:
        """The machine, if the caller holds its lease (when it has one) and its state allows
        ``verb``; a Fly-shaped 409/412 otherwise."""
        machine = self.require(app, machine_id)
        self._check_lease(machine, nonce)
        if not allowed(machine.state):
            raise PreconditionFailed(
                f"unable to {verb} machine from current state: '{machine.state}'",
                field="state",
                state=str(machine.state),
            )
        return machine

    def _running_vm(self, app: str, machine_id: str, verb: str) -> VmHandleData:
        """The VM of a started machine (exec, ps, signal); 412 otherwise."""
        machine = self.require(app, machine_id)
        handle = self._runs.get_vm_handle(machine_id)
        if machine.state is not MachineState.STARTED or handle is None:
            raise PreconditionFailed(
                f"unable to {verb} machine from current state: '{machine.state}'",
                field="state",
                state=str(machine.state),
            )
        return handle

    # writing
    def create(self, app: str, request: CreateMachineRequest, actor: str) -> MachineView:
        now = self._clock.now()
        self._check_config_size(request.config)
        self._images.check(request.config.image)
        region = self._check_placement(request.region, request.config)
        self._check_secrets(app, request)
        self._quotas.check(app, request.config)
        volume_host = self._check_mounts(app, request.config, region)
        if volume_host is not None and self._volumes is not None:
            launching = not request.skip_launch
            self._volumes.check_room(request.config, region, volume_host, launching)
        if request.config.guest.gpus:
            self._platform.admit_gpu_machine(request.config, region)
        elif request.config.guest.gpu_part:
            self._platform.admit_gpu_part(request.config, region)
        if not request.skip_launch:
            self._platform.admit(request.config, region)
        machine_id = new_machine_id()
        current = self._store.get_app(app)
        host_id = self._host.id
        if self._placer is not None:
            host_id, region = self._placer.place(
                machine_id,
                region,
                request.config,
                launching=not request.skip_launch,
                host_id=volume_host,
            )
        machine = Machine(
            id=machine_id,
            name=request.name or f"{app}-{machine_id[:6]}",
            app=app,
            app_id=current.id if current is not None else "",
            state=MachineState.CREATED,
            region=region,
            instance_id=new_ulid(now),
            version=1,
            config=request.config,
            created_at=now,
            updated_at=now,
            host_id=host_id,
            private_ip=(
                self._addresses.for_machine(app, machine_id, host_id)
                if self._addresses is not None
                else ""
            ),
            cordoned=request.skip_service_registration,
            skip_secrets=request.skip_secrets,
        )
        try:
            self._store.insert_machine(machine)
        except BaseException:
            if self._placer is not None and not request.skip_launch:
                self._placer.release(host_id, machine_id)  # nothing half done
            raise
        self._record(machine_id, "launch", "created")
        nonce = None
        if request.lease_ttl:
            lease = self._new_lease(request.lease_ttl, "", actor)
            self._store.put_lease(machine_id, lease)
            nonce = lease.nonce
        # skip_launch still resolves the image, so that a bad reference fails at create.
        self._agent.submit_operation(
            machine_id, PrepareRequest() if request.skip_launch else CreateRequest()
        )
        self._agent.notify(machine_id)
        return self.view(machine, nonce=nonce)

    def update(
        self, app: str, machine_id: str, request: UpdateMachineRequest, nonce: str | None
    ) -> MachineView:
        machine = self.require(app, machine_id, include_destroyed=False)
        self._check_lease(machine, nonce)
        if request.current_version is not None and request.current_version != str(machine.version):
            raise PreconditionFailed(
                f"current_version {request.current_version} does not match {machine.version}",
                field="current_version",
            )
        if machine.state == MachineState.DESTROYING:
            raise PreconditionFailed(f"machine {machine_id} is being destroyed")
        self._check_config_size(request.config)
        self._images.check(request.config.image)
        region = self._check_placement(request.region or machine.region, request.config)
        self._quotas.check(app, request.config, replacing=machine)
        running = machine.state.holds_resources and request.skip_launch
        volume_host = self._check_mounts(app, request.config, region, machine, running)
        if volume_host is not None and self._volumes is not None:
            self._volumes.check_room(request.config, region, volume_host, launching=False)
        self._check_secrets(app, request)
        if request.config.guest.gpus:
            self._platform.admit_gpu_machine(request.config, machine.region)
        elif request.config.guest.gpu_part:
            self._platform.admit_gpu_part(request.config, machine.region)
        relaunch = machine.state.holds_resources and not request.skip_launch
        if relaunch:
            self._platform.admit(request.config, machine.region, machine_id)
        if request.skip_secrets != machine.skip_secrets:
            self._store.set_skip_secrets(machine_id, request.skip_secrets, self._clock.now())
        version = machine.version + 1
        self._agent.submit_operation(
            machine_id,
            UpdateRequest(
                config=request.config,
                version=version,
                instance_id=new_ulid(self._clock.now()),
                relaunch=relaunch,
                metadata_before=dict(machine.config.metadata),
            ),
        )
        self._record(machine_id, "update", "requested", reason=f"version {version}")
        return self.view(machine)

    def start(self, app: str, machine_id: str, nonce: str | None) -> StartResponse:
        machine = self._ready_for(app, machine_id, nonce, "start", lambda state: state.startable)
        self._platform.admit(machine.config, machine.region, machine_id)
        self._agent.submit_operation(machine_id, StartRequest())
        self._record(machine_id, "start", "requested")
        return StartResponse(previous_state=str(machine.state))

    def stop(self, app: str, machine_id: str, request: StopRequest, nonce: str | None) -> None:
        self._ready_for(app, machine_id, nonce, "stop", lambda state: state in STOPPABLE_STATES)
        signum = None if request.signal is None else signal_number(request.signal)
        self._agent.submit_operation(machine_id, StopRun(signal=signum, timeout_s=request.timeout))
        self._record(machine_id, "stop", "requested")

    def suspend(self, app: str, machine_id: str, nonce: str | None) -> None:
        """Save the guest (memory, devices; a sandbox's kernel state and memory) and end its
        VMM; ``start`` restores it. A GPU machine cannot be (a VFIO device cannot be migrated,
        nor a GPU slice's state saved): 422."""
        machine = self._ready_for(
            app, machine_id, nonce, "suspend", lambda state: state is MachineState.STARTED
        )
        if machine.config.guest.gpu_part:
            raise SuspendNotSupported(
                f"config.guest: machine {machine_id} holds a GPU slice or share, whose state "
                "cannot be saved",
                field="config.guest",
            )

        if machine.config.guest.gpus:
            raise SuspendNotSupported(
                f"config.guest.gpus: machine {machine_id} has GPUs, and a VFIO device cannot "
                "be suspended",
                field="config.guest.gpus",
            )
        self._agent.submit_operation(machine_id, SuspendRequest())
        self._record(machine_id, "suspend", "requested")

    def restart(
        self,
        app: str,
        machine_id: str,
        nonce: str | None,
        signal: str | None = None,
        timeout: str | None = None,
    ) -> None:
        """``?signal=`` and ``?timeout=`` (a Go duration, as flaps sends them) for the stop."""
        self._ready_for(
            app, machine_id, nonce, "restart", lambda state: state is MachineState.STARTED
        )
        try:
            signum = signal_number(signal) if signal else None
        except ValueError as error:
            raise InvalidRequest(f"signal: {error}", field="signal") from None
        try:
            timeout_s = parse_duration(timeout) if timeout else None
        except ValueError as error:
            raise InvalidRequest(f"timeout: {error}", field="timeout") from None
        self._agent.submit_operation(machine_id, RestartRequest(signal=signum, timeout_s=timeout_s))
        self._record(machine_id, "restart", "requested")

    async def signal(self, app: str, machine_id: str, signal_name: str, nonce: str | None) -> None:
        if self._remote is not None:
            await self._remote.signal(self.require(app, machine_id), signal_name, nonce)
            return
        self._ready_for(
            app, machine_id, nonce, "signal", lambda state: state is MachineState.STARTED
        )
        handle = self._running_vm(app, machine_id, "signal")
        try:
            await self._agent.platform.signal(handle, signal_number(signal_name))
        except SignalNotDelivered as error:
            raise PreconditionFailed(
                f"machine {machine_id}: {error} (it may still be booting; try again)",
                field="state",
                retryable=True,
            ) from None
        self._record(machine_id, "signal", "sent", reason=signal_name)

    def destroy(self, app: str, machine_id: str, force: bool, nonce: str | None) -> None:
        machine = self._ready_for(
            app,
            machine_id,
            nonce,
            "destroy",
            lambda state: state not in (MachineState.DESTROYED, MachineState.DESTROYING),
        )
        if machine.state.holds_resources and not force:
            raise PreconditionFailed(
                f"unable to destroy machine in state '{machine.state}'; stop it or pass force=true",
                field="force",
            )
        self._agent.submit_operation(machine_id, DestroyRequest(force=force))
        if force:
            # Whatever the machine is doing (a pull from a slow registry, a boot) stops now.
            self._agent.cancel_for_destroy(machine_id, "the machine is being destroyed")
        self._record(machine_id, "destroy", "requested")

    def set_cordoned(self, app: str, machine_id: str, cordoned: bool, nonce: str | None) -> None:
        """``cordon``: out of the proxy's rotation, running as before; ``uncordon``: back."""
        machine = self.require(app, machine_id, include_destroyed=False)
        self._check_lease(machine, nonce)
        if machine.cordoned != cordoned:
            self._store.set_cordoned(machine_id, cordoned, self._clock.now())
        self._record(machine_id, "cordon" if cordoned else "uncordon", "requested")
        self._agent.notify()

    async def wait(
        self,
        app: str,
        machine_id: str,
        states: Sequence[str],
        timeout_s: int,
        instance_id: str | None,
        from_event_id: str | None = None,
        version: str | None = None,
    ) -> WaitResponse:
        """Until the machine is in any of ``states``: as the instance ``instance_id``, at
        config ``version``, and (``from_event_id``) having got there after that event."""
        wanted = wanted_states(states)
        deadline = self._clock.monotonic() + timeout_s
        while True:
            machine = self.require(app, machine_id)
            state = str(machine.state)
            same_instance = instance_id in (None, "", machine.instance_id) or state == "destroyed"
            same_version = version in (None, "", str(machine.version))
            if state in wanted and same_instance and same_version:
                event_id = self._arrival(machine_id, state, from_event_id)
                if event_id is not None or from_event_id in (None, ""):
                    return WaitResponse(
                        state=state, event_id=event_id, version=str(machine.version)
                    )
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                raise WaitTimeout(
                    f"deadline_exceeded: machine {machine_id} did not reach "
                    f"{' or '.join(sorted(wanted))} within {timeout_s}s (now {machine.state})",
                    field="timeout",
                )
            await self._agent.wait_for_change(min(remaining, 1.0))

    def _arrival(self, machine_id: str, state: str, after: str | None) -> str | None:
        """The newest event that says the machine reached ``state`` (after ``after``, when
        given); None if there is none."""
        for event in self._store.list_events(machine_id, WAIT_EVENTS_SCANNED):
            if after and event.id <= after:
                return None
            if event.status == state:
                return event.id
        return None

    # inside the guest
    async def exec(self, app: str, machine_id: str, request: ExecRequest) -> ExecResponse:
        if self._remote is not None:
            return await self._remote.exec(self.require(app, machine_id), request)
        handle = self._running_vm(app, machine_id, "exec on")
        try:
            result = await self._agent.platform.exec(
                handle, request.argv(), request.stdin.encode(), request.timeout_s()
            )
        except GuestExecError as error:
            raise ServiceUnavailable(
                f"machine {machine_id}: {error}", app=app, reason="guest_exec"
            ) from None
        except (InvalidRequest, RequestTooLarge) as error:
            raise _naming_its_field(error) from None
        return ExecResponse(
            exit_code=result.exit_code,
            stdout=result.stdout.decode(errors="replace"),
            stderr=result.stderr.decode(errors="replace"),
            stdout_truncated=result.stdout_truncated,
            stderr_truncated=result.stderr_truncated,
            timed_out=result.timed_out,
        )

    async def processes(
        self, app: str, machine_id: str, sort_by: str | None, order: str | None
    ) -> list[ProcessStat]:
        if self._remote is not None:
            return await self._remote.processes(self.require(app, machine_id), sort_by, order)
        key = sort_by or "pid"
        if key not in PROCESS_SORT_KEYS:
            raise InvalidRequest(
                f"sort_by must be one of {list(PROCESS_SORT_KEYS)}", field="sort_by"
            )
        if order not in (None, "", "asc", "desc"):
            raise InvalidRequest("order must be asc or desc", field="order")
        handle = self._running_vm(app, machine_id, "list the processes of")
        try:
            found = await self._agent.platform.processes(handle)
        except GuestExecError as error:
            raise ServiceUnavailable(
                f"machine {machine_id}: {error}", app=app, reason="guest_exec"
            ) from None
        stats = [process_stat(process) for process in found]
        stats.sort(key=lambda stat: getattr(stat, key), reverse=order == "desc")
        return stats

    # metadata
    def get_metadata(self, app: str, machine_id: str) -> dict[str, str]:
        return dict(self.require(app, machine_id).config.metadata)

    def get_metadata_value(self, app: str, machine_id: str, key: str) -> str:
        metadata = self.require(app, machine_id).config.metadata
        if key not in metadata:
            raise NotFound(f"metadata key {key} not found", field="key")
        return metadata[key]

    def set_metadata(
        self, app: str, machine_id: str, key: str, value: str | None, nonce: str | None
    ) -> None:
        machine = self.require(app, machine_id, include_destroyed=False)
        self._check_lease(machine, nonce)
        _check_metadata_key(key, "key")
        if value is None and key not in machine.config.metadata:
            raise NotFound(f"metadata key {key} not found", field="key")
        self._store.update_metadata(machine_id, {key: value}, self._clock.now())

    def update_metadata(
        self, app: str, machine_id: str, changes: dict[str, str | None], nonce: str | None
    ) -> dict[str, str]:
        """Several keys at once: set where given a value, removed where ``""`` or ``null``."""
        machine = self.require(app, machine_id, include_destroyed=False)
        self._check_lease(machine, nonce)
        for key in changes:
            _check_metadata_key(key, f"metadata.{key}")
        normalized = {key: value or None for key, value in changes.items()}
        return self._store.update_metadata(machine_id, normalized, self._clock.now())

    # leases
    def _new_lease(self, ttl: int, description: str, owner: str) -> Lease:
        return Lease(
            nonce=secrets.token_hex(12),
            expires_at=int(self._clock.now() + ttl),
            owner=owner,
            description=description,
            version=new_ulid(self._clock.now()),
        )

    def acquire_lease(
        self,
        app: str,
        machine_id: str,
        request: LeaseRequest,
        nonce: str | None,
        owner: str,
        ttl: int | None = None,
    ) -> LeaseView:
        """``ttl``: the query's (``?ttl=N``, as flaps asks), else the body's, else 30 s."""
        ttl = ttl or request.ttl or DEFAULT_LEASE_TTL_S
        machine = self.require(app, machine_id, include_destroyed=False)
        if machine.state == MachineState.DESTROYING:
            # The destroy run drops the machine's lease; one taken now would outlive it.
            raise PreconditionFailed(f"machine {machine_id} is being destroyed", field="state")
        current = self._store.get_lease(machine_id)
        now = self._clock.now()
        if current is not None and current.expires_at > now:
            if nonce != current.nonce:
                raise Conflict(
                    f"machine {machine_id} already has a lease until {current.expires_at}",
                    field="lease",
                )
            lease = current.model_copy(
                update={"expires_at": int(now + ttl), "version": new_ulid(now)}
            )
        else:
            lease = self._new_lease(ttl, request.description, owner)
        self._store.put_lease(machine_id, lease)
        return LeaseView(data=LeaseData(**lease.model_dump()))

    def get_lease(self, app: str, machine_id: str) -> LeaseView:
        self.require(app, machine_id)
        lease = self._store.get_lease(machine_id)
        if lease is None or lease.expires_at <= self._clock.now():
            raise NotFound(f"machine {machine_id} has no lease", field="lease")
        return LeaseView(data=LeaseData(**lease.model_dump()))

    def release_lease(self, app: str, machine_id: str, nonce: str | None) -> None:
        self.require(app, machine_id)
        lease = self._store.get_lease(machine_id)
        if lease is None or lease.expires_at <= self._clock.now():
            raise NotFound(f"machine {machine_id} has no lease", field="lease")
        if nonce != lease.nonce:
            raise Conflict("lease nonce does not match", field="fly-machine-lease-nonce")
        self._store.delete_lease(machine_id)

    def busy(self, machine_id: str) -> bool:
        """True while the agent still has an operation queued or running for the machine."""
        return self._agent.has_unfinished_run(machine_id)


def _naming_its_field(error: InvalidRequest | RequestTooLarge) -> HangarError:
    """The same error, its message starting with the field it names (``cmd: ...``)."""
    field = error.fields.get("field")
    if not field or error.message.startswith(f"{field}:"):
        return error
    return type(error)(f"{field}: {error.message}", **error.fields)


def _check_metadata_key(key: str, field: str) -> None:
    try:
        validate_metadata_key(key)
    except ValueError as exc:
        raise Unprocessable(str(exc), field=field) from None
