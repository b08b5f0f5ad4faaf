"""Who is looking at the dashboard, and what their token lets them see.

The answers come from the API's own access policy (``hangar.api.access``), asked the same
questions the API's routes ask: a page shows an app's machines only if the token may read
that app, usage and capacity only if it may read its org, hosts and GPUs only if it is the
operator's. Another org's machines never reach a page.
"""

from __future__ import annotations

from dataclasses import dataclass

from hangar.api.access import AccessPolicy
from hangar.api.scopes import Scope
from hangar.errors import HangarError
from hangar.store.protocol import ApiToken, App, MachineStore, TokenKind


@dataclass(frozen=True)
class Viewer:
    token: ApiToken
    apps: tuple[App, ...]
    """The apps whose machines this token may read."""
    org_wide: bool
    """May read org-wide things: usage, capacity by region."""

    @property
    def operator(self) -> bool:
        return self.token.kind == TokenKind.OPERATOR

    @property
    def app_names(self) -> frozenset[str]:
        return frozenset(app.name for app in self.apps)

    @property
    def org(self) -> str | None:
        """The org whose usage it sees (None: the operator, every org)."""
        return None if self.operator else self.token.org_slug

    @property
    def description(self) -> str:
        if self.operator:
            return "operator"
        mode = " (read-only)" if self.token.read_only else ""
        if self.token.app_name is not None:
            return f"app {self.token.app_name} of org {self.token.org_slug}{mode}"
        return f"org {self.token.org_slug}{mode}"


class Viewers:
    def __init__(self, policy: AccessPolicy, machines: MachineStore) -> None:
        self._policy = policy
        self._machines = machines

    def authenticate(self, secret: str) -> ApiToken:
        """The token behind ``secret`` (``Unauthenticated`` if none, expired or revoked)."""
        return self._policy.authenticate(f"Bearer {secret}")

    def viewer(self, secret: str) -> Viewer:
        token = self.authenticate(secret)
        if token.kind == TokenKind.OPERATOR:
            apps = tuple(self._machines.list_apps(None))
        else:
            candidates = self._machines.list_apps(token.org_slug)
            apps = tuple(app for app in candidates if self._may(token, Scope.APP_READ, app.name))
        return Viewer(token=token, apps=apps, org_wide=self._may(token, Scope.ORG_READ))

    def _may(self, token: ApiToken, scope: Scope, app_name: str | None = None) -> bool:
        params = {"app_name": app_name} if app_name is not None else {}
        try:
            self._policy.authorize(token, scope, params)
        except HangarError:
            return False
        return True
