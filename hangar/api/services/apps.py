"""Apps: create, list, get, delete."""

from __future__ import annotations

from hangar.api.schemas import AppList, AppView, CreateAppRequest, OrganizationView
from hangar.clock import Clock
from hangar.errors import NotFound, PreconditionFailed
from hangar.store.protocol import App, ClusterStore


class AppService:
    def __init__(self, store: ClusterStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def require(self, name: str) -> App:
        app = self._store.get_app(name)
        if app is None:
            raise NotFound(f"app {name} not found", app=name)
        return app

    def view(self, app: App) -> AppView:
        machines = self._store.list_machines(app.name)
        return AppView(
            id=app.name,
            name=app.name,
            organization=OrganizationView(name=app.org_slug, slug=app.org_slug),
            machine_count=len(machines),
        )

    def create(self, request: CreateAppRequest) -> AppView:
        app = self._store.create_app(request.app_name, request.org_slug, self._clock.now())
        return self.view(app)

    def list(self, org_slug: str | None) -> AppList:
        apps = [self.view(app) for app in self._store.list_apps(org_slug)]
        return AppList(total_apps=len(apps), apps=apps)

    def delete(self, name: str) -> None:
        self.require(name)
        live = self._store.list_machines(name)
        if live:
            raise PreconditionFailed(
                f"app {name} still has {len(live)} machine(s); destroy them first", app=name
            )
        self._store.delete_app(name)
