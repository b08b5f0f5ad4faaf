"""Volumes: the volumes API's verbs, checked (a 4xx before anything is written), turned
into durable agent runs on the volume (``vol:ID``) whose end they wait for; and the checks of
a machine's ``config.mounts``.

A volume lives on one host; this API places volumes on the host it runs with, and checks
sizes and free space against that host's volume library before it records anything. A fleet's
API replica keeps no volume library: it hands what must touch a host's disk (create, delete)
to the relay (``remote``), whose host's agent runs this same service there.
"""

from __future__ import annotations

import asyncio
import hashlib

from hangar.agent.agent import Agent
from hangar.agent.volumes import HostVolumes
from hangar.api.services.platform import PlatformService
from hangar.api.services.quotas import QuotaService
from hangar.api.services.remote import RemoteGuests
from hangar.api.volume_schemas import (
    CreateVolumeRequest,
    ExtendVolumeRequest,
    ExtendVolumeResponse,
    UpdateVolumeRequest,
    VolumeSnapshotView,
    VolumeView,
)
from hangar.clock import Clock
from hangar.errors import (
    Conflict,
    HangarError,
    InsufficientCapacity,
    NotFound,
    Unprocessable,
    VolumeError,
)
from hangar.model.config import MachineConfig, MountConfig
from hangar.model.host import HostInfo
from hangar.model.machine import Machine
from hangar.model.run import (
    RunRecord,
    RunStatus,
    VolumeCreateRequest,
    VolumeDeleteRequest,
    VolumeExtendRequest,
    VolumeRequest,
    VolumeSnapshotRequest,
    volume_subject,
)
from hangar.model.volume import Volume, VolumeState
from hangar.store.protocol import RunStore, VolumeStore
from hangar.store.volume_claims import change_volume, volume_not_found
from hangar.volumes import ForkOf, FromSnapshot, ImageInfo, VolumeSource, VolumeSpec
from hangar.volumes.attach import check_attach, check_detach, check_mount_count
from hangar.volumes.model import DEFAULT_RETENTION_DAYS, new_snapshot_id, new_volume_id

RUN_WAIT_S = 60.0
"""How long a request waits for its volume's run; past it, the volume is answered as it
is (``creating``...) and the run goes on."""
MOUNTS_FIELD = "config.mounts"


def zone_of(host_id: str) -> str:
    """A volume's zone: its host, as a short stable name."""
    return hashlib.sha256(host_id.encode()).hexdigest()[:4]


class VolumeService:
    def __init__(
        self,
        store: VolumeStore,
        runs: RunStore,
        agent: Agent,
        clock: Clock,
        host: HostInfo,
        quotas: QuotaService,
        platform: PlatformService,
        remote: RemoteGuests | None = None,
    ) -> None:
        """``remote``: an API replica's relay to the volumes' hosts."""
        self._remote = remote
        self._store = store
        self._runs = runs
        self._agent = agent
        self._clock = clock
        self._host = host
        self._quotas = quotas
        self._platform = platform

    @property
    def _library(self) -> HostVolumes:
        volumes = self._agent.host.volumes
        if volumes is None:
            raise Unprocessable("this host keeps no volumes", field="region")
        return volumes

    # ---- reading -----------------------------------------------------------------------

    def require(self, app: str, volume_id: str, *, live: bool = False) -> Volume:
        """The app's volume (``live``: not destroyed); another app's answers as one that
        does not exist."""
        volume = self._store.get_volume(volume_id)
        if volume is None or volume.app != app:
            raise volume_not_found(volume_id, app)
        if live and volume.state is VolumeState.DESTROYED:
            raise NotFound(f"volume {volume_id} is destroyed", volume_id=volume_id)
        return volume

    def _image(self, volume: Volume) -> ImageInfo | None:
        volumes = self._agent.host.volumes
        if volumes is None or volume.host_id != volumes.host_id:
            return None
        if volume.state in (VolumeState.DESTROYED, VolumeState.FAILED):
            return None
        try:
            return volumes.host.info(volume.id)
        except HangarError:
            return None

    async def view(self, volume: Volume) -> VolumeView:
        return VolumeView.of(volume, await asyncio.to_thread(self._image, volume))

    async def list_views(self, app: str, include_deleted: bool = False) -> list[VolumeView]:
        volumes = self._store.list_volumes(app, include_destroyed=include_deleted)
        return list(await asyncio.gather(*(self.view(volume) for volume in volumes)))

    def snapshots(self, app: str, volume_id: str) -> list[VolumeSnapshotView]:
        volume = self.require(app, volume_id)
        return [VolumeSnapshotView.of(s, volume.snapshot_retention) for s in volume.snapshots]

    # ---- runs --------------------------------------------------------------------------

    async def _run(
        self, volume_id: str, request: VolumeRequest, run_id: str | None = None
    ) -> RunRecord:
        """Submit ``request`` on the volume and wait (bounded) for it to end; a run that
        failed is answered with its error (a 409 when the volume is attached meanwhile)."""
        subject = volume_subject(volume_id)
        run = self._agent.submit_operation(subject, request, run_id=run_id)
        deadline = self._clock.monotonic() + RUN_WAIT_S
        while True:
            current = next((r for r in self._runs.list_runs(subject) if r.id == run.id), run)
            if not current.status.unfinished:
                break
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return current
            await self._agent.wait_for_change(min(remaining, 1.0))
        if current.status is RunStatus.FAILED:
            volume = self._store.get_volume(volume_id)
            if volume is not None and volume.attached_machine_id is not None:
                raise Conflict(
                    f"volume {volume_id} is attached to machine {volume.attached_machine_id}: "
                    f"{current.error}",
                    volume_id=volume_id,
                )
            raise VolumeError(
                f"volume {volume_id}: {request.operation} failed: {current.error}",
                retryable=False,
                volume_id=volume_id,
            )
        return current

    # ---- writing -----------------------------------------------------------------------

    def _source(self, app: str, request: CreateVolumeRequest) -> tuple[Volume, VolumeSource] | None:
        """The volume a restore or fork copies, checked: of this app, made, on this host."""
        if request.snapshot_id is None and request.source_volume_id is None:
            return None
        if request.snapshot_id is not None:
            candidates = (
                [self.require(app, request.source_volume_id, live=True)]
                if request.source_volume_id is not None
                else self._store.list_volumes(app)
            )
            source = next((v for v in candidates if v.snapshot(request.snapshot_id)), None)
            if source is None:
                raise NotFound(
                    f"snapshot {request.snapshot_id} not found in app {app}",
                    field="snapshot_id",
                )
            found: VolumeSource = FromSnapshot(volume_id=source.id, snapshot_id=request.snapshot_id)
        else:
            assert request.source_volume_id is not None
            source = self.require(app, request.source_volume_id, live=True)
            found = ForkOf(volume_id=source.id)
        if source.state is not VolumeState.CREATED:
            raise Conflict(
                f"volume {source.id} is {source.state}; it cannot be copied now",
                field="source_volume_id",
            )
        if source.host_id != self._library.host_id:
            raise InsufficientCapacity(
                f"source_volume_id: volume {source.id} is on host {source.host_id}, which this "
                "API does not place on",
                field="source_volume_id",
            )
        return source, found

    async def create(self, app: str, request: CreateVolumeRequest) -> VolumeView:
        if self._remote is not None:
            return await self._remote.create_volume(app, request)
        region = request.region or self._host.region
        if region != self._host.region:
            raise InsufficientCapacity(
                f"insufficient capacity: no host for volumes in region {region}",
                field="region",
                region=region,
            )
        library = self._library
        zone = zone_of(library.host_id)
        if request.require_unique_zone and any(
            v.name == request.name and v.zone == zone for v in self._store.list_volumes(app)
        ):
            raise InsufficientCapacity(
                f"require_unique_zone: app {app} has a volume named {request.name} in the "
                "only zone this API places volumes in",
                field="require_unique_zone",
            )
        if request.compute is not None:
            self._platform.check_room_on(request.compute, region, library.host_id, "compute")
        source = self._source(app, request)
        size_gb = request.size_gb
        if size_gb is None:
            size_gb = source[0].size_gb if source is not None else 1
        spec = VolumeSpec(
            id=new_volume_id(), size_gb=size_gb, encrypted=request.encrypted, fstype=request.fstype
        )
        await asyncio.to_thread(
            library.host.check_create, spec, source[1] if source is not None else None
        )
        self._quotas.check_volume(app, size_gb)
        now = self._clock.now()
        state = VolumeState.CREATING
        if source is not None:
            from_snapshot = isinstance(source[1], FromSnapshot)
            state = VolumeState.RESTORING if from_snapshot else VolumeState.HYDRATING
        volume = Volume(
            id=spec.id,
            name=request.name,
            app=app,
            region=region,
            zone=zone,
            host_id=library.host_id,
            size_gb=size_gb,
            encrypted=request.encrypted,
            fstype=request.fstype,
            state=state,
            snapshot_retention=request.snapshot_retention or DEFAULT_RETENTION_DAYS,
            source_volume_id=source[0].id if source is not None else None,
            snapshot_id=request.snapshot_id,
            created_at=now,
            updated_at=now,
        )
        self._store.insert_volume(volume)
        run = VolumeCreateRequest(
            size_gb=size_gb,
            encrypted=request.encrypted,
            fstype=request.fstype,
            source_volume_id=volume.source_volume_id,
            snapshot_id=request.snapshot_id,
        )
        await self._run(volume.id, run, run_id=f"{volume_subject(volume.id)}.create")
        return await self.view(self.require(app, volume.id))

    async def update(self, app: str, volume_id: str, request: UpdateVolumeRequest) -> VolumeView:
        self.require(app, volume_id, live=True)
        changes = request.model_dump(exclude_none=True)
        volume = change_volume(
            self._store,
            volume_id,
            lambda current: current.model_copy(update=changes),
            self._clock.now(),
        )
        return await self.view(volume)

    def _ready(self, app: str, volume_id: str) -> Volume:
        volume = self.require(app, volume_id, live=True)
        if volume.state is not VolumeState.CREATED:
            raise Conflict(
                f"volume {volume_id} is {volume.state}; try again once it is created",
                volume_id=volume_id,
                state=str(volume.state),
            )
        return volume

    async def extend(
        self, app: str, volume_id: str, request: ExtendVolumeRequest
    ) -> ExtendVolumeResponse:
        volume = self._ready(app, volume_id)
        if self._remote is not None:
            self._quotas.check_volume(app, request.size_gb, replacing=volume)
            return await self._remote.extend_volume(volume, request)
        await asyncio.to_thread(self._library.host.check_extend, volume_id, request.size_gb)
        self._quotas.check_volume(app, request.size_gb, replacing=volume)
        await self._run(volume_id, VolumeExtendRequest(size_gb=request.size_gb))
        mounts = self._library.host.mounts
        return ExtendVolumeResponse(
            volume=await self.view(self.require(app, volume_id)),
            needs_restart=await asyncio.to_thread(mounts.waits_for_remount, volume_id),
        )

    async def snapshot(self, app: str, volume_id: str) -> VolumeSnapshotView:
        volume = self._ready(app, volume_id)
        if self._remote is not None:
            return await self._remote.snapshot_volume(volume)
        await asyncio.to_thread(self._library.host.check_snapshot, volume_id)
        snapshot_id = new_snapshot_id()
        await self._run(volume_id, VolumeSnapshotRequest(snapshot_id=snapshot_id))
        volume = self.require(app, volume_id)
        taken = volume.snapshot(snapshot_id)
        if taken is None:
            raise Conflict(f"snapshot {snapshot_id} of {volume_id} is still being taken")
        return VolumeSnapshotView.of(taken, volume.snapshot_retention)

    async def _let_go(self, volume: Volume) -> Volume:
        """A volume whose machine has stopped but whose run is still releasing it (an exit
        records the stop before it detaches): wait (bounded) for that run to end."""
        holder = volume.attached_machine_id
        machine = self._agent.machines.get_machine(holder) if holder is not None else None
        if machine is None or machine.state.holds_resources:
            return volume
        deadline = self._clock.monotonic() + RUN_WAIT_S
        while self._agent.has_unfinished_run(machine.id):
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                break
            await self._agent.wait_for_change(min(remaining, 1.0))
        return self.require(volume.app, volume.id, live=True)

    async def delete(self, app: str, volume_id: str) -> VolumeView:
        if self._remote is not None:
            return await self._remote.delete_volume(self.require(app, volume_id, live=True))
        volume = await self._let_go(self.require(app, volume_id, live=True))
        if volume.attached_machine_id is not None:
            raise Conflict(
                f"volume {volume_id} is attached to machine {volume.attached_machine_id}; "
                "destroy that machine (or change its mounts) first",
                volume_id=volume_id,
                attached_to=volume.attached_machine_id,
            )
        if volume.state.being_made:
            raise Conflict(f"volume {volume_id} is {volume.state}; delete it once it is made")
        await self._run(volume_id, VolumeDeleteRequest())
        return await self.view(self.require(app, volume_id))

    # ---- machines' mounts --------------------------------------------------------------

    def check_mounts(
        self,
        app: str,
        config: MachineConfig,
        region: str,
        machine: Machine | None = None,
        running: bool = False,
    ) -> str | None:
        """Check ``config.mounts`` of a machine of ``app`` in ``region`` (``machine``: the one
        being updated; ``running``: it runs and is not relaunched, so its disks cannot
        change). Returns the host the mounted volumes are on (None: it mounts none)."""
        mounts = config.mounts
        check_mount_count(len(mounts))
        before = {m.volume for m in machine.config.mounts} if machine is not None else set()
        machine_id = machine.id if machine is not None else ""
        if running:
            for volume_id in {m.volume for m in mounts} - before:
                attached = self._store.get_volume(volume_id)
                holder = attached.attached_machine_id if attached is not None else None
                check_attach(volume_id, machine_id, attached_to=holder, machine_running=True)
            for volume_id in before - {m.volume for m in mounts}:
                check_detach(volume_id, machine_id, attached_to=machine_id, machine_running=True)
        hosts = {self._check_mount(app, mount, region, machine_id) for mount in mounts}
        if len(hosts) > 1:
            raise Unprocessable(
                f"{MOUNTS_FIELD}: the volumes are on different hosts ({', '.join(sorted(hosts))});"
                " a machine runs on one",
                field=MOUNTS_FIELD,
            )
        return next(iter(hosts), None)

    def _check_mount(self, app: str, mount: MountConfig, region: str, machine_id: str) -> str:
        volume = self._store.get_volume(mount.volume)
        if volume is None or volume.app != app or volume.state is VolumeState.DESTROYED:
            raise Unprocessable(
                f"{MOUNTS_FIELD}: volume {mount.volume} not found in app {app}",
                field=f"{MOUNTS_FIELD}.volume",
                volume_id=mount.volume,
            )
        if mount.name is not None and mount.name != volume.name:
            raise Unprocessable(
                f"{MOUNTS_FIELD}: volume {volume.id} is named {volume.name}, not {mount.name}",
                field=f"{MOUNTS_FIELD}.name",
            )
        if region and volume.region != region:  # a fleet's machine of no region: any
            raise Unprocessable(
                f"{MOUNTS_FIELD}: volume {volume.id} is in region {volume.region}; the machine "
                f"is in {region}",
                field=f"{MOUNTS_FIELD}.volume",
                volume_id=volume.id,
            )
        if volume.state is not VolumeState.CREATED:
            raise Conflict(
                f"{MOUNTS_FIELD}: volume {volume.id} is {volume.state}, not created",
                field=f"{MOUNTS_FIELD}.volume",
                volume_id=volume.id,
            )
        if volume.attached_machine_id not in (None, machine_id):
            raise Conflict(
                f"{MOUNTS_FIELD}: volume {volume.id} is attached to machine "
                f"{volume.attached_machine_id}",
                field=f"{MOUNTS_FIELD}.volume",
                volume_id=volume.id,
                attached_to=volume.attached_machine_id,
            )
        return volume.host_id

    def check_room(
        self, config: MachineConfig, region: str, host_id: str, launching: bool = True
    ) -> None:
        """A machine with mounts runs where its volumes are: placed there (the scheduler's
        hard constraint), which must be a host this API places on (any host, for a fleet's
        replica) and, for a machine about to launch, have room for it now."""
        if host_id != self._host.id and self._remote is None:
            raise InsufficientCapacity(
                f"{MOUNTS_FIELD}: the volumes are on host {host_id}, which this API does not "
                "place machines on",
                field=MOUNTS_FIELD,
                host_id=host_id,
            )
        if launching:
            self._platform.check_room_on(config.guest, region, host_id, MOUNTS_FIELD)
