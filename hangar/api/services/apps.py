"""Apps: create, list, get, delete; each in one org, seen only by that org and the operator.
An app is shown as fly-go's ``App`` decodes it (``network``, ``internal_numeric_id``,
``machine_count``, ``volume_count``, ``organization``).

Deleting an app deletes every record of its machines (configs, events, leases, runs) and its
secrets; its name stays with its org for ``name_hold_s`` before another org may take it."""

from __future__ import annotations

from hangar.api.access import Access, app_not_found
from hangar.api.schemas import (
    DEFAULT_NETWORK,
    AppList,
    AppView,
    CreateAppRequest,
    OrganizationView,
)
from hangar.api.services.orgs import DEFAULT_ORG, OrgService
from hangar.clock import Clock
from hangar.errors import PreconditionFailed
from hangar.model.run import volume_subject
from hangar.store.protocol import (
    App,
    MachineStore,
    RunStore,
    SecretStore,
    TenancyStore,
    VolumeStore,
)


class AppService:
    def __init__(
        self,
        store: MachineStore,
        tenancy: TenancyStore,
        orgs: OrgService,
        clock: Clock,
        runs: RunStore | None = None,
        name_hold_s: float = 0.0,
        volumes: VolumeStore | None = None,
        secrets: SecretStore | None = None,
    ) -> None:
        self._volumes = volumes
        self._store = store
        self._tenancy = tenancy
        self._orgs = orgs
        self._clock = clock
        self._secrets = secrets
        self._runs = runs
        self._name_hold_s = name_hold_s

    def require(self, name: str) -> App:
        app = self._store.get_app(name)
        if app is None:
            raise app_not_found(name)
        return app

    def view(self, app: App) -> AppView:
        machines = self._store.list_machines(app.name)
        org = self._tenancy.get_org(app.org_slug)
        return AppView(
            id=app.name,
            name=app.name,
            internal_numeric_id=app.numeric_id,
            network=app.network,
            organization=OrganizationView(
                name=org.name if org is not None else app.org_slug, slug=app.org_slug
            ),
            machine_count=len(machines),
            volume_count=len(self._volumes.list_volumes(app.name)) if self._volumes else 0,
        )

    def create(self, access: Access, request: CreateAppRequest) -> AppView:
        org_slug = request.org_slug or access.token.org_slug or DEFAULT_ORG
        self._orgs.require(access, org_slug)
        access.note(org=org_slug, app_name=request.app)
        app = self._store.create_app(
            request.app,
            org_slug,
            self._clock.now(),
            network=DEFAULT_NETWORK,
            name_hold_s=self._name_hold_s,
        )
        return self.view(app)

    def list(self, access: Access, org_slug: str | None) -> AppList:
        if org_slug is not None:
            self._orgs.require(access, org_slug)
        elif not access.is_operator:
            org_slug = access.token.org_slug
        apps = [self.view(app) for app in self._store.list_apps(org_slug)]
        return AppList(total_apps=len(apps), apps=apps)

    def delete(self, name: str) -> None:
        self.require(name)
        live = self._store.list_machines(name)
        if live:
            raise PreconditionFailed(
                f"app {name} still has {len(live)} machine(s); destroy them first", app=name
            )
        volumes = self._volumes.list_volumes(name) if self._volumes else []
        if volumes:
            raise PreconditionFailed(
                f"app {name} still has {len(volumes)} volume(s); destroy them first", app=name
            )
        forgotten = self._store.delete_app(name, self._clock.now())
        if self._secrets is not None:
            self._secrets.delete_app_secrets(name)
        if self._volumes is not None:
            # Volumes belong to the app's name: the destroyed ones go with the app.
            volume_ids = self._volumes.forget_volumes(name)
            forgotten += [volume_subject(volume_id) for volume_id in volume_ids]
        if self._runs is not None and forgotten:
            self._runs.forget_machines(forgotten)
