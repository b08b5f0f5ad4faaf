"""Model deployments over hangar itself: what ``hangar llm`` and ``/v1/orgs/{org}/llm/...`` do,
and the gateway's seams wired to hangar's tokens, store, machines and metering.

A deployment's replicas are ordinary machines of its app (marked with ``REPLICA_METADATA``),
started, stopped and created through ``MachineService`` as any API client's machines are;
their address is the machine's private address and the engine's port. With weights on a
volume, deploy snapshots the volume once and every replica gets a volume restored from that
snapshot, mounted at ``/models``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hangar.api.access import Access
from hangar.api.llm_schemas import ApiKeyCreated, DeploymentView, ReplicaView
from hangar.api.schemas import CreateAppRequest, CreateMachineRequest, StopRequest, iso8601
from hangar.api.services.apps import AppService
from hangar.api.services.machines import MachineService
from hangar.api.services.orgs import OrgService
from hangar.api.services.tokens import TokenService, hash_secret
from hangar.api.services.volumes import VolumeService
from hangar.api.volume_schemas import CreateVolumeRequest
from hangar.clock import Clock
from hangar.errors import (
    Conflict,
    HangarError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    Unauthenticated,
    Unprocessable,
)
from hangar.llm.images import check_model_file, deployment_image
from hangar.llm.native import EngineArgs
from hangar.llm.seams import Caller, Replica, ReplicaState, Usage
from hangar.llm.seams import Deployment as GatewayDeployment
from hangar.model.config import GuestConfig, MachineConfig, MountConfig
from hangar.model.host import HostInfo
from hangar.model.llm import (
    MODELS_DIR,
    REPLICA_METADATA,
    ApiKey,
    Deployment,
    DeploymentSpec,
    Engine,
    ModelSource,
    ScaleSpec,
    TokenUsage,
    new_deployment_id,
    new_key_id,
)
from hangar.model.machine import Machine, MachineState
from hangar.model.volume import Volume, VolumeState
from hangar.store.llm import LlmStore
from hangar.store.protocol import MachineStore, TokenKind, VolumeStore
from hangar.vmm.errors import SuspendNotSupported

log = logging.getLogger(__name__)

KEY_PREFIX = "hgl_"
ACTOR = "llm-gateway"
WEIGHTS_VOLUME = "llm_weights"
WAIT_S = 120
_STARTING = (
    MachineState.CREATED,
    MachineState.STARTING,
    MachineState.REPLACING,
    MachineState.STOPPING,
    MachineState.SUSPENDING,
)
_GONE = (MachineState.DESTROYING, MachineState.DESTROYED)


@dataclass(frozen=True)
class EngineImages:
    """Where deployments' engine images are written and what a model path may be."""

    layout: Path
    cache: Path
    allowed_model_dirs: tuple[Path, ...]
    configured_server: Path | None = None

    async def image_for(self, deployment_id: str, model: Path | None) -> str:
        return await asyncio.to_thread(
            deployment_image,
            self.layout,
            deployment_id,
            self.cache,
            model=model,
            configured_server=self.configured_server,
        )


def engine_env(deployment: Deployment) -> dict[str, str]:
    """The engine's settings as ``LLAMA_ARG_*`` variables (the engine image's contract)."""
    args = EngineArgs(
        model=Path(MODELS_DIR) / deployment.model.file,
        alias=deployment.name,
        parallel=deployment.concurrency,
        context=deployment.context,
        threads=deployment.cpus,
    )
    # Every address: the machine is reached at its private IPv6 address.
    return {**args.environment(), "LLAMA_ARG_HOST": "::", "LLAMA_ARG_PORT": str(deployment.port)}


def address_of(machine: Machine, port: int) -> str:
    return f"http://[{machine.private_ip}]:{port}" if machine.private_ip else ""


class LlmService:
    def __init__(
        self,
        store: LlmStore,
        cluster: MachineStore,
        apps: AppService,
        orgs: OrgService,
        machines: MachineService,
        volumes: VolumeService,
        volume_store: VolumeStore,
        images: EngineImages,
        clock: Clock,
        host: HostInfo,
    ) -> None:
        self.store = store
        self._cluster = cluster
        self._apps = apps
        self._orgs = orgs
        self._machines = machines
        self._volumes = volumes
        self._volume_store = volume_store
        self._images = images
        self._clock = clock
        self._host = host
        self._lock = asyncio.Lock()  # one replica change at a time (counts against max)

    # -- reading --------------------------------------------------------------------------
    def require(self, access: Access, org: str, name: str) -> Deployment:
        self._orgs.require(access, org)
        deployment = self.store.deployment_named(org, name)
        if deployment is None:
            raise NotFound(f"deployment {name} not found in org {org}", field="name")
        return deployment

    def replicas(self, deployment: Deployment) -> list[Machine]:
        return [
            machine
            for machine in self._cluster.list_machines(deployment.app)
            if machine.config.metadata.get(REPLICA_METADATA) == deployment.id
            and machine.state not in _GONE
        ]

    def view(self, deployment: Deployment) -> DeploymentView:
        return DeploymentView(
            id=deployment.id,
            name=deployment.name,
            org=deployment.org,
            app=deployment.app,
            model=str(deployment.model),
            engine=deployment.engine,
            image=deployment.image,
            cpus=deployment.cpus,
            memory_mb=deployment.memory_mb,
            min_replicas=deployment.min_replicas,
            max_replicas=deployment.max_replicas,
            region=deployment.region,
            created_at=iso8601(deployment.created_at),
            replicas=[
                ReplicaView(
                    id=machine.id,
                    state=str(machine.state),
                    region=machine.region,
                    host=machine.host_id,
                    private_ip=machine.private_ip,
                )
                for machine in self.replicas(deployment)
            ],
            usage=self.store.token_totals(deployment.org, deployment.id),
        )

    def list_views(self, access: Access, org: str) -> list[DeploymentView]:
        self._orgs.require(access, org)
        return [self.view(d) for d in self.store.list_deployments(org)]

    # -- writing --------------------------------------------------------------------------
    async def deploy(self, access: Access, org: str, spec: DeploymentSpec) -> DeploymentView:
        self._orgs.require(access, org)
        if self.store.deployment_named(org, spec.name) is not None:
            raise Conflict(f"org {org} already has a deployment named {spec.name}", field="name")
        region = spec.region or self._host.region
        if region != self._host.region:
            raise Unprocessable(f"region: no host serves region {region}", field="region")
        source = ModelSource.parse(spec.model)
        model = None
        if source.path and spec.engine is Engine.LLAMA_CPP:
            model = check_model_file(Path(source.path), self._images.allowed_model_dirs)
        app_name = spec.app_name or f"llm-{spec.name}".replace(".", "-")
        app = self._cluster.get_app(app_name)
        if app is not None and app.org_slug != org:
            raise NotFound(f"app {app_name} not found in org {org}", field="app_name")
        volume_id = self._volume_id(app_name, source.volume) if source.volume else ""
        # Everything is checked: from here on what is made is undone if a later part fails.
        made_app = app is None
        if made_app:
            self._apps.create(access, CreateAppRequest(app_name=app_name, org_slug=org))
        deployment_id = new_deployment_id()
        try:
            snapshot_id = ""
            if volume_id:
                snapshot_id = (await self._volumes.snapshot(app_name, volume_id)).id
            if spec.engine is Engine.IMAGE:
                assert spec.image is not None
                image = spec.image
            else:
                image = await self._images.image_for(deployment_id, model)
        except BaseException:
            if made_app:
                self._apps.delete(app_name)
            raise
        deployment = Deployment(
            id=deployment_id,
            org=org,
            name=spec.name,
            app=app_name,
            model=source,
            engine=spec.engine,
            image=image,
            port=spec.port,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            gpu_kind=spec.gpu_kind,
            gpus=spec.gpus,
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            concurrency=spec.concurrency,
            context=spec.context,
            region=region,
            volume=volume_id,
            snapshot=snapshot_id,
            created_at=self._clock.now(),
        )
        self.store.insert_deployment(deployment)
        access.note(org=org, deployment=deployment.id)
        await self.ensure_min(deployment)
        return self.view(deployment)

    def _volume_id(self, app: str, name_or_id: str) -> str:
        live = [v for v in self._volumes_of(app) if name_or_id in (v.id, v.name)]
        if len(live) != 1:
            raise Unprocessable(
                f"model: app {app} has {'no' if not live else 'more than one'} volume {name_or_id}",
                field="model",
            )
        return live[0].id

    def _volumes_of(self, app: str) -> list[Volume]:
        return [
            volume
            for volume in self._volume_store.list_volumes(app)
            if volume.state is not VolumeState.DESTROYED
        ]

    async def scale(self, access: Access, org: str, name: str, spec: ScaleSpec) -> DeploymentView:
        deployment = self.require(access, org, name)
        low = deployment.min_replicas if spec.min_replicas is None else spec.min_replicas
        high = deployment.max_replicas if spec.max_replicas is None else spec.max_replicas
        if low > high:
            raise InvalidRequest("min_replicas is larger than max_replicas", field="min_replicas")
        deployment = deployment.model_copy(update={"min_replicas": low, "max_replicas": high})
        self.store.save_deployment(deployment)
        await self.ensure_min(deployment)
        # Past the new maximum: the newest replicas go (stopped ones first).
        surplus = self.replicas(deployment)[high:]
        for machine in surplus:
            await self._remove(deployment, machine)
        return self.view(deployment)

    async def destroy(self, access: Access, org: str, name: str) -> None:
        deployment = self.require(access, org, name)
        for machine in self.replicas(deployment):
            await self._remove(deployment, machine)
        self.store.delete_deployment(deployment.id)
        access.note(org=org, deployment=deployment.id)

    async def create_key(self, access: Access, org: str, name: str) -> ApiKeyCreated:
        deployment = self.require(access, org, name)
        key = ApiKey(
            id=new_key_id(), org=org, deployment=deployment.id, created_at=self._clock.now()
        )
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        self.store.insert_key(key, hash_secret(secret))
        access.note(org=org, deployment=deployment.id, key=key.id)
        return ApiKeyCreated(id=key.id, deployment=name, key=secret)

    # -- replicas -------------------------------------------------------------------------
    async def ensure_min(self, deployment: Deployment) -> None:
        """Create replicas (started) until the deployment has ``min_replicas``."""
        while len(self.replicas(deployment)) < deployment.min_replicas:
            await self.add_replica(deployment)

    async def add_replica(self, deployment: Deployment) -> Machine:
        """One more replica, being started; its weights' volume first when they are on one."""
        async with self._lock:
            if len(self.replicas(deployment)) >= deployment.max_replicas:
                raise ServiceUnavailable(
                    f"deployment {deployment.name} has its maximum of "
                    f"{deployment.max_replicas} replicas",
                    app=deployment.app,
                    reason="at max_replicas",
                )
            mounts: list[MountConfig] = []
            if deployment.snapshot:
                volume = await self._volumes.create(
                    deployment.app,
                    CreateVolumeRequest(
                        name=WEIGHTS_VOLUME,
                        snapshot_id=deployment.snapshot,
                        source_volume_id=deployment.volume,
                        encrypted=False,
                    ),
                )
                mounts.append(MountConfig(volume=volume.id, path=MODELS_DIR))
            config = MachineConfig(
                image=deployment.image,
                env=engine_env(deployment),
                guest=GuestConfig(
                    cpus=deployment.cpus,
                    memory_mb=deployment.memory_mb,
                    gpu_kind=deployment.gpu_kind,
                    gpus=deployment.gpus,
                ),
                metadata={REPLICA_METADATA: deployment.id},
                mounts=mounts,
            )
            view = self._machines.create(
                deployment.app,
                CreateMachineRequest(config=config, region=deployment.region),
                ACTOR,
            )
            log.info("deployment %s: replica %s created", deployment.id, view.id)
            return self._machines.require(deployment.app, view.id)

    async def _remove(self, deployment: Deployment, machine: Machine) -> None:
        """Destroy a replica and the copy of the weights it had."""
        if machine.state not in _GONE:
            self._machines.destroy(deployment.app, machine.id, force=True, nonce=None)
        await self._machines.wait(deployment.app, machine.id, ["destroyed"], WAIT_S, None)
        for mount in machine.config.mounts:
            try:
                await self._volumes.delete(deployment.app, mount.volume)
            except HangarError as exc:
                log.warning("deployment %s: volume %s: %s", deployment.id, mount.volume, exc)

    async def wake(self, deployment: Deployment, machine_id: str) -> Machine:
        self._machines.start(deployment.app, machine_id, None)
        await self._machines.wait(deployment.app, machine_id, ["started"], WAIT_S, None)
        return self._machines.require(deployment.app, machine_id)

    async def sleep(self, deployment: Deployment, machine_id: str) -> None:
        """Suspend the replica: its memory, the loaded model included, kept on disk, so that
        waking it skips the engine's start and the model's load. A replica that cannot be
        suspended (a GPU, the sandbox tier) or whose suspend failed (it runs on) is stopped."""
        app = deployment.app
        before = self._machines.events(app, machine_id, 1)
        try:
            self._machines.suspend(app, machine_id, None)
        except SuspendNotSupported:
            await self._stop(app, machine_id)
            return
        # Suspended, or started again by a suspend that failed: whichever comes after it.
        settled = await self._machines.wait(
            app,
            machine_id,
            ["suspended", "started"],
            WAIT_S,
            None,
            from_event_id=before[0].id if before else None,
        )
        if settled.state != "suspended":
            log.warning("replica %s could not be suspended; stopping it", machine_id)
            await self._stop(app, machine_id)

    async def _stop(self, app: str, machine_id: str) -> None:
        self._machines.stop(app, machine_id, StopRequest(), None)
        await self._machines.wait(app, machine_id, ["stopped"], WAIT_S, None)


# -- the gateway's seams, over the service above ---------------------------------------------


def gateway_deployment(deployment: Deployment) -> GatewayDeployment:
    return GatewayDeployment(
        id=deployment.id,
        org=deployment.org,
        name=deployment.name,
        app=deployment.app,
        min_replicas=deployment.min_replicas,
        max_replicas=deployment.max_replicas,
        concurrency=deployment.concurrency,
        created_at=int(deployment.created_at),
    )


class HangarAuthenticator:
    """Org tokens (not app tokens, not the operator's: the gateway serves orgs) and
    per-deployment API keys (``hgl_...``, stored hashed)."""

    def __init__(self, tokens: TokenService, store: LlmStore) -> None:
        self._tokens = tokens
        self._store = store

    async def authenticate(self, token: str) -> Caller | None:
        if token.startswith(KEY_PREFIX):
            key = self._store.key_by_hash(hash_secret(token))
            if key is None or key.revoked_at is not None:
                return None
            if self._store.get_deployment(key.deployment) is None:
                return None
            return Caller(org=key.org, token_id=key.id, deployment=key.deployment)
        try:
            api_token = self._tokens.authenticate(token)
        except Unauthenticated:
            return None
        if api_token.kind != TokenKind.ORG or api_token.org_slug is None:
            return None
        if api_token.app_name is not None:
            return None
        return Caller(org=api_token.org_slug, token_id=api_token.id)


class StoreDeployments:
    def __init__(self, store: LlmStore) -> None:
        self._store = store

    async def of_org(self, org: str) -> Sequence[GatewayDeployment]:
        return [gateway_deployment(d) for d in self._store.list_deployments(org)]

    async def all(self) -> Sequence[GatewayDeployment]:
        return [gateway_deployment(d) for d in self._store.list_deployments()]


def replica_state(state: MachineState) -> ReplicaState:
    if state is MachineState.STARTED:
        return ReplicaState.STARTED
    if state in _STARTING:
        return ReplicaState.STARTING
    if state is MachineState.SUSPENDED:
        return ReplicaState.SUSPENDED
    return ReplicaState.STOPPED


class MachineReplicas:
    """Replicas as machines: listed from the store, woken with ``start``, put to sleep with
    ``stop``, added with ``create``."""

    def __init__(self, service: LlmService) -> None:
        self._service = service

    def _deployment(self, deployment_id: str) -> Deployment:
        found = self._service.store.get_deployment(deployment_id)
        if found is None:
            raise NotFound(f"deployment {deployment_id} is gone", deployment=deployment_id)
        return found

    @staticmethod
    def _replica(deployment: Deployment, machine: Machine) -> Replica:
        return Replica(
            id=machine.id,
            deployment=deployment.id,
            address=address_of(machine, deployment.port),
            state=replica_state(machine.state),
        )

    async def list(self, deployment: GatewayDeployment) -> Sequence[Replica]:
        found = self._service.store.get_deployment(deployment.id)
        if found is None:
            return []
        return [self._replica(found, m) for m in self._service.replicas(found)]

    async def wake(self, replica: Replica) -> Replica:
        deployment = self._deployment(replica.deployment)
        return self._replica(deployment, await self._service.wake(deployment, replica.id))

    async def sleep(self, replica: Replica) -> None:
        await self._service.sleep(self._deployment(replica.deployment), replica.id)

    async def scale_out(self, deployment: GatewayDeployment) -> Replica:
        found = self._deployment(deployment.id)
        return self._replica(found, await self._service.add_replica(found))


class StoreMetering:
    """Prompt and completion tokens per org and deployment, in the LLM store beside the
    machine-time intervals (``GET /v1/orgs/{org}/llm/deployments/{name}`` sums them)."""

    def __init__(self, store: LlmStore) -> None:
        self._store = store

    async def record(self, usage: Usage) -> None:
        self._store.record_tokens(
            TokenUsage(
                org=usage.org,
                deployment=usage.deployment,
                token_id=usage.token_id,
                endpoint=usage.endpoint,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                at=usage.at,
            )
        )
