"""Who is calling and what they may touch: a token, checked against a route's scope.

Another org's app answers exactly as an app that does not exist (404), so that no token
learns what other orgs have; a token that may see the app but lacks the right gets 403.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hangar.api.scopes import Scope
from hangar.api.services.tokens import TokenService
from hangar.errors import Forbidden, NotFound, Unauthenticated
from hangar.store.protocol import ApiToken, App, MachineStore, TokenKind


def app_not_found(name: str) -> NotFound:
    """The one answer for an app that does not exist or that the caller may not know of."""
    return NotFound(f"app {name} not found", app=name)


def org_not_found(slug: str) -> NotFound:
    return NotFound(f"org {slug} not found", field="org_slug")


@dataclass
class Access:
    """A request the guard let through: its token, its scope and, on app routes, the app."""

    token: ApiToken
    scope: Scope
    app: App | None = None
    audit_target: dict[str, str] = field(default_factory=dict)

    @property
    def is_operator(self) -> bool:
        return self.token.kind == TokenKind.OPERATOR

    @property
    def actor(self) -> str:
        return self.token.id

    @property
    def org_slug(self) -> str | None:
        """The org the request acts in: the app's, else the token's (None: operator, any)."""
        if self.app is not None:
            return self.app.org_slug
        return self.token.org_slug

    def note(self, **target: str) -> None:
        """Name what the request acted on, for the audit log (e.g. the machine it created)."""
        self.audit_target.update(target)

    def require_org(self, slug: str) -> None:
        """An org token acts in its own org only; any other org does not exist for it."""
        if not self.is_operator and slug != self.token.org_slug:
            raise org_not_found(slug)


def bearer_secret(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing token: send Authorization: Bearer <token>")
    scheme, _, secret = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("malformed Authorization header: expected Bearer <token>")
    return secret.strip()


class AccessPolicy:
    def __init__(self, tokens: TokenService, cluster: MachineStore) -> None:
        self._tokens = tokens
        self._cluster = cluster

    def authenticate(self, authorization: str | None) -> ApiToken:
        return self._tokens.authenticate(bearer_secret(authorization))

    def authorize(self, token: ApiToken, scope: Scope, path_params: Mapping[str, str]) -> Access:
        if scope.on_app:
            return self._authorize_app(token, scope, path_params["app_name"])
        if token.kind == TokenKind.OPERATOR:
            return Access(token, scope)
        if scope == Scope.OPERATOR:
            raise Forbidden("this route needs an operator token", scope=str(scope))
        if token.app_name is not None:
            raise Forbidden(f"token {token.id} acts on app {token.app_name} only", scope=str(scope))
        if scope.writes and token.read_only:
            raise Forbidden(f"token {token.id} is read-only", scope=str(scope))
        return Access(token, scope)

    def _authorize_app(self, token: ApiToken, scope: Scope, app_name: str) -> Access:
        app = self._cluster.get_app(app_name)
        if app is None:
            raise app_not_found(app_name)
        if token.kind == TokenKind.OPERATOR:
            return Access(token, scope, app)
        if app.org_slug != token.org_slug:
            raise app_not_found(app_name)
        if token.app_name is not None and token.app_name != app.name:
            raise Forbidden(f"token {token.id} acts on app {token.app_name} only", scope=str(scope))
        if scope.writes and token.read_only:
            raise Forbidden(f"token {token.id} is read-only", scope=str(scope))
        return Access(token, scope, app)
