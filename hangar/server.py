"""``hangar server``: API + scheduler + agent in one process, state in SQLite under $HANGAR_HOME."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from hangar.agent.agent import Agent
from hangar.agent.engine import crash_after
from hangar.agent.gpus import HostGpus
from hangar.agent.host import HostServices
from hangar.agent.metering import UsageMeter
from hangar.agent.mps import MpsSupervisor
from hangar.agent.network import MachineNetwork
from hangar.agent.placement import HostPlacement
from hangar.agent.platform import GuestPlatform
from hangar.agent.services import AgentBackends, HealthChecks
from hangar.agent.volumes import HostVolumes
from hangar.api.access import AccessPolicy
from hangar.api.app import create_app
from hangar.api.console import ConsoleReaders
from hangar.api.deps import Services
from hangar.api.guard import GuardConfig
from hangar.api.services.addresses import PrivateAddresses
from hangar.api.services.apps import AppService
from hangar.api.services.audit import AuditService
from hangar.api.services.hosts import HostService
from hangar.api.services.image_policy import ImagePolicy
from hangar.api.services.llm import (
    EngineImages,
    HangarAuthenticator,
    LlmService,
    MachineReplicas,
    StoreDeployments,
    StoreMetering,
)
from hangar.api.services.machines import MachineService
from hangar.api.services.orgs import DEFAULT_ORG, OrgService
from hangar.api.services.placement import MachinePlacer
from hangar.api.services.platform import PlatformService
from hangar.api.services.quotas import QuotaService
from hangar.api.services.remote import RemoteGuests
from hangar.api.services.secrets import SecretService
from hangar.api.services.tokens import TokenService
from hangar.api.services.usage import UsageService
from hangar.api.services.volumes import VolumeService
from hangar.clock import Clock, SystemClock
from hangar.http_server import ConnectionLimits
from hangar.llm.gateway import Gateway, GatewayConfig
from hangar.llm.listener import GatewayListener
from hangar.llm.pool import PoolPolicy
from hangar.metrics import HangarMetrics, StateCollector
from hangar.model.host import HostInfo, read_local_host
from hangar.model.usage import DEFAULT_PRICES, PriceTable
from hangar.net.host import HostNetConfig, HostNetwork
from hangar.proxy.proxy import Proxy
from hangar.proxy.settings import ProxySettings
from hangar.ratelimit import RateLimit, RateLimiter, RateLimits
from hangar.scheduler import ClaimStore
from hangar.scheduler.machines import Overcommit
from hangar.settings import Settings
from hangar.store.embedded import EmbeddedStores, open_embedded_stores
from hangar.store.llm import LlmStore
from hangar.store.protocol import (
    MachineStore,
    OrgQuotas,
    RunStore,
    SecretStore,
    TenancyStore,
    VolumeStore,
)
from hangar.store.usage import UsageStore
from hangar.volumes import VolumeHost, VolumeSettings
from hangar.web.app import create_web_app
from hangar.web.events import EventStreams
from hangar.web.logs import uvicorn_log_config
from hangar.web.pages import DashboardReader
from hangar.web.viewer import Viewers

log = logging.getLogger(__name__)

BOOTSTRAP_TOKEN_DESCRIPTION = "operator.token file"
AUTOSTOP_INTERVAL_S = 15.0


@dataclass
class EmbeddedServer:
    settings: Settings
    stores: EmbeddedStores
    tokens: TokenService
    agent: Agent
    host: HostInfo
    app: FastAPI
    traffic: MachineTraffic
    metrics: HangarMetrics
    web: FastAPI
    llm: LlmService

    @property
    def home(self) -> Path:
        return self.settings.home


def default_org_quotas(settings: Settings) -> OrgQuotas:
    """What a new org may use until the operator says otherwise."""
    return OrgQuotas(
        machines=settings.default_org_machines,
        memory_mb=settings.default_org_memory_mb,
        gpus=dict(settings.default_org_gpus),
    )


def overcommit_of(settings: Settings) -> Overcommit:
    return Overcommit(cpu=settings.cpu_overcommit, memory=settings.memory_overcommit)


@dataclass(frozen=True)
class ApiStores:
    """The stores the Machines API reads and writes: one SQLite file on one host, etcd (and
    what the agents publish) in a fleet (``hangar.fleet.replica``)."""

    machines: MachineStore
    tenancy: TenancyStore
    volumes: VolumeStore
    runs: RunStore
    usage: UsageStore
    claims: ClaimStore
    secrets: SecretStore
    llm: LlmStore


@dataclass(frozen=True)
class Api:
    services: Services
    guard: GuardConfig
    tokens: TokenService
    policy: AccessPolicy
    llm: LlmService


def build_api(
    settings: Settings,
    clock: Clock,
    stores: ApiStores,
    agent: Agent,
    host: HostInfo,
    metrics: HangarMetrics,
    rate_limits: RateLimits | None = None,
    *,
    network: MachineNetwork | None = None,
    placer: MachinePlacer | None = None,
    hosts: HostService | None = None,
    addresses: PrivateAddresses | None = None,
    remote: RemoteGuests | None = None,
) -> Api:
    """The Machines API's services and request guard, the same for ``hangar server`` and a
    fleet's ``hangar api`` replicas: a fleet passes its ``placer`` (the scheduler choosing a
    host per machine), its ``hosts`` view, how it gives machines their ``addresses`` and its
    relay to the hosts' guests (``remote``); one host passes its private ``network``."""
    machines, tenancy = stores.machines, stores.tenancy
    if network is not None:
        host_number = network.host_number
        addresses = PrivateAddresses(machines, tenancy, network.net.plan, lambda _: host_number)
    default_quotas = default_org_quotas(settings)
    quotas = QuotaService(machines, tenancy, runs=stores.runs, volumes=stores.volumes)
    capacity = PlatformService(
        stores.claims,
        settings.gpu_driver_bundle,
        overcommit=overcommit_of(settings),
        share_kinds=settings.gpu_share_kinds,
    )
    volumes = VolumeService(
        stores.volumes, stores.runs, agent, clock, host, quotas, capacity, remote=remote
    )
    orgs = OrgService(tenancy, quotas, clock, default_quotas=default_quotas)
    tokens = TokenService(tenancy, machines, clock)
    audit = AuditService(tenancy, clock, retention_s=settings.audit_retention_days * 86400)
    apps = AppService(
        machines,
        tenancy,
        orgs,
        clock,
        runs=stores.runs,
        name_hold_s=settings.app_name_hold_s,
        volumes=stores.volumes,
        secrets=stores.secrets,
    )
    machine_service = MachineService(
        machines,
        stores.runs,
        agent,
        clock,
        host,
        quotas,
        ImagePolicy(settings.allowed_oci_dirs),
        capacity,
        addresses=addresses,
        secrets=stores.secrets,
        volumes=volumes if placer is None or remote is not None else None,
        max_config_bytes=settings.max_config_bytes,
        console=ConsoleReaders(clock, follow_max_s=settings.logs_follow_max_s),
        placer=placer,
        remote=remote,
    )
    llm = LlmService(
        stores.llm,
        machines,
        apps,
        orgs,
        machine_service,
        volumes,
        stores.volumes,
        EngineImages(
            layout=settings.llm_images_dir,
            cache=settings.cache_dir,
            allowed_model_dirs=settings.allowed_oci_dirs,
            configured_server=settings.llama_server,
        ),
        clock,
        host,
    )
    services = Services(
        apps=apps,
        machines=machine_service,
        orgs=orgs,
        tokens=tokens,
        audit=audit,
        hosts=hosts if hosts is not None else HostService(agent, host),
        platform=capacity,
        secrets=SecretService(stores.secrets, clock),
        usage=UsageService(
            stores.usage,
            orgs,
            PriceTable.parse(settings.prices, DEFAULT_PRICES),
            clock,
            tokens=stores.llm,
        ),
        metrics=metrics,
        volumes=volumes,
        llm=llm,
    )
    policy = AccessPolicy(tokens, machines)
    guard = GuardConfig(
        policy=policy,
        limiter=RateLimiter(rate_limits or RateLimits.parse(settings.rate_limits), clock),
        audit=audit,
        max_body_bytes=settings.max_request_bytes,
        anonymous=RateLimiter(
            RateLimits(default=RateLimit.parse(settings.anonymous_rate_limit), actions={}), clock
        ),
        body_timeout_s=settings.header_timeout_s,
        observer=metrics,
    )
    return Api(services, guard, tokens, policy, llm)


def build_server(
    settings: Settings,
    platform: GuestPlatform | None = None,
    clock: Clock | None = None,
    rate_limits: RateLimits | None = None,
    claims: ClaimStore | None = None,
) -> EmbeddedServer:
    """Everything ``hangar server`` runs; ``rate_limits`` defaults to the settings' (Fly's
    documented limits where they name none). ``platform`` and ``claims`` replace the real
    guest platform and the SQLite claim store (tests observe through them)."""
    clock = clock or SystemClock()
    for private in (settings.home, settings.machines_dir, settings.cache_dir):
        make_private_dir(private)
    stores = open_embedded_stores(
        settings.database, settings.secrets_key_file, keep_versions=settings.config_versions_kept
    )
    machines, tenancy = stores.machines, stores.tenancy
    default_quotas = default_org_quotas(settings)
    for org_slug in {DEFAULT_ORG} | {app.org_slug for app in machines.list_apps(None)}:
        tenancy.ensure_org(org_slug, clock.now(), quotas=default_quotas)
    metrics = HangarMetrics(clock)
    if platform is None:
        from hangar.agent.guest import QemuGuestPlatform

        platform = QemuGuestPlatform.from_settings(settings, image_observer=metrics)
    host = read_local_host(settings.host_id, settings.region)
    claim_store = claims if claims is not None else stores.claims
    network = (
        MachineNetwork(HostNetwork(HostNetConfig.from_settings(settings)), clock)
        if settings.net
        else None
    )
    services_of_host = HostServices(
        platform=platform,
        machines_dir=settings.machines_dir,
        placement=HostPlacement(
            claim_store, host, observer=metrics, overcommit=overcommit_of(settings)
        ),
        gpu_store=stores.gpus,
        gpus=HostGpus.from_settings(settings),
        network=network,
        secrets=stores.secrets,
        volumes=HostVolumes(
            VolumeHost(VolumeSettings.from_settings(settings), clock=clock),
            stores.volumes,
            host.id,
        ),
        mps=MpsSupervisor(settings.mps_pipe_root) if settings.gpu_share_kinds else None,
    )
    meter = UsageMeter(
        stores.usage,
        machines,
        stores.runs,
        services_of_host,
        clock,
        checkpoint_s=settings.usage_checkpoint_s,
    )
    agent = Agent(
        machines,
        stores.runs,
        services_of_host,
        clock,
        crash_after(settings.crash_after_step, settings.crash_after_step_file),
        meter=meter,
        observers=(metrics,),
    )
    metrics.register(StateCollector(machines, claim_store, settings.cache_dir))
    api = build_api(
        settings,
        clock,
        ApiStores(
            machines,
            tenancy,
            stores.volumes,
            stores.runs,
            stores.usage,
            claim_store,
            stores.secrets,
            stores.llm,
        ),
        agent,
        host,
        metrics,
        rate_limits,
        network=network,
    )
    services, policy = api.services, api.policy
    reader = DashboardReader(machines, claim_store, stores.gpus)
    web = create_web_app(
        Viewers(policy, machines),
        reader,
        services.usage,
        EventStreams(machines, reader, agent.wait_for_change, clock),
        clock,
    )
    traffic = MachineTraffic.for_agent(agent, settings, clock)
    if settings.llm:
        traffic.gateway = GatewayListener(
            model_gateway(api.llm, api.tokens, settings, clock),
            settings.llm_bind,
            settings.llm_port,
            ConnectionLimits.of(settings),
        )
    app = create_app(
        services, api.guard, on_startup=traffic.start, on_shutdown=traffic.close, web=web
    )
    return EmbeddedServer(
        settings=settings,
        stores=stores,
        tokens=api.tokens,
        agent=agent,
        host=host,
        app=app,
        traffic=traffic,
        metrics=metrics,
        web=web,
        llm=api.llm,
    )


def model_gateway(
    llm: LlmService, tokens: TokenService, settings: Settings, clock: Clock
) -> Gateway:
    """The OpenAI-compatible gateway over this server's deployments (``hangar llm``)."""
    idle_s = settings.llm_idle_s
    return Gateway(
        HangarAuthenticator(tokens, llm.store),
        StoreDeployments(llm.store),
        MachineReplicas(llm),
        StoreMetering(llm.store),
        clock=clock,
        config=GatewayConfig(
            max_body_bytes=settings.max_request_bytes,
            reconcile_interval_s=min(5.0, idle_s / 4),
            pool=PoolPolicy(idle_s=idle_s),
        ),
    )


def make_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700), or take group and other access away from it: everything
    under ``$HANGAR_HOME`` (the database, machines' env in their initrd, their disks, the
    image cache) is the server user's alone."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s was mode %o: making it private (0700)", path, mode)
        path.chmod(0o700)


@dataclass
class MachineTraffic:
    """What runs beside the agent in ``hangar server``: the health checks of its machines,
    the proxy publishing their services and the model gateway (each off when the settings
    say so)."""

    agent: Agent
    checks: HealthChecks | None
    proxy: Proxy | None
    gateway: GatewayListener | None = None

    @classmethod
    def for_agent(
        cls, agent: Agent, settings: Settings, clock: Clock, *, proxy_everywhere: bool = False
    ) -> MachineTraffic:
        """``proxy_everywhere``: the proxy publishes every host's machines (a fleet host on
        the fleet's private network); the checks stay this host's."""
        backends = AgentBackends(agent)
        proxy = None
        if settings.proxy:
            proxy_settings = ProxySettings(
                domain=settings.proxy_domain,
                bind_host=settings.proxy_bind,
                port_map=settings.proxy_port_map,
                idle_stop_s=settings.proxy_idle_stop_s,
                autostop_interval_s=min(AUTOSTOP_INTERVAL_S, settings.proxy_idle_stop_s / 4),
                state_dir=settings.proxy_state_dir,
            )
            proxy = Proxy(
                AgentBackends(agent, everywhere=True) if proxy_everywhere else backends,
                proxy_settings,
                clock,
            )
        return cls(agent, HealthChecks(agent, backends) if settings.net else None, proxy)

    async def start(self) -> None:
        await self.agent.start()
        if self.checks is not None:
            await self.checks.start()
        if self.proxy is not None:
            await self.proxy.start()
        if self.gateway is not None:
            await self.gateway.start()
            log.info("model gateway: %s", self.gateway.url)

    async def close(self) -> None:
        if self.gateway is not None:
            await self.gateway.close()
        if self.proxy is not None:
            await self.proxy.close()
        if self.checks is not None:
            await self.checks.close()
        await self.agent.close()


def write_operator_token(path: Path, secret: str) -> Path:
    """``$HANGAR_HOME/operator.token``, readable by its owner alone from the first byte."""
    scratch = path.with_suffix(".tmp")
    scratch.unlink(missing_ok=True)
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as token_file:
        token_file.write(secret + "\n")
    scratch.replace(path)
    return path


def bootstrap_operator_token(
    token_file: Path, tokens: TokenService, renew: bool = False
) -> str | None:
    """On a first start (no operator token yet), or with ``renew`` (``hangar server --init``,
    which also revokes the previous file's token): mint an operator token and write it to
    ``$HANGAR_HOME/operator.token``. Returns the secret when it minted one."""
    active = tokens.active_operator_tokens()
    if active and not renew:
        return None
    if renew:
        for token in active:
            if token.description == BOOTSTRAP_TOKEN_DESCRIPTION:
                tokens.revoke(token.id)
    _token, secret = tokens.issue_operator(BOOTSTRAP_TOKEN_DESCRIPTION)
    write_operator_token(token_file, secret)
    return secret


def mint_operator_token(settings: Settings, description: str) -> tuple[str, str]:
    """``hangar admin token``, on the server's host: an operator token straight into the
    server's database (no API involved). Returns (token id, secret)."""
    if not settings.database.exists():
        raise FileNotFoundError(settings.database)
    stores = open_embedded_stores(settings.database)
    tokens = TokenService(stores.tenancy, stores.machines, SystemClock())
    token, secret = tokens.issue_operator(description)
    return token.id, secret


def serve(settings: Settings, host: str, port: int, init: bool = False) -> None:
    from hangar import http_server

    # Every file the server (and the QEMU it starts) creates is its user's alone.
    os.umask(0o077)
    server = build_server(settings)
    token_file = settings.operator_token_file
    secret = bootstrap_operator_token(token_file, server.tokens, renew=init)
    if secret is not None:
        log.info("operator token written to %s", token_file)
        if init:
            print(f"operator token (also written to {token_file}):")
            print(secret, flush=True)
    log.info("hangar server: home %s, listening on %s:%d", settings.home, host, port)
    limits = http_server.ConnectionLimits.of(settings)
    http_server.run(server.app, host, port, limits, log_config=uvicorn_log_config())
