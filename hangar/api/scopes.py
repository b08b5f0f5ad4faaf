"""What each route needs of the caller's token. Every route declares it, next to its path:

    @router.post("/{machine_id}/stop")
    @requires(Scope.APP_WRITE)
    async def stop_machine(...): ...

The request guard enforces the declaration before the route runs; a route that declares
nothing is treated as operator-only, and the isolation matrix test fails until it declares.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, TypeVar

SCOPE_ATTRIBUTE = "__hangar_scope__"
OPENAPI_EXTENSION = "x-hangar-scope"


class Scope(enum.StrEnum):
    APP_READ = "app:read"
    """Read one app and its machines (path has ``{app_name}``): the operator, tokens of the
    app's org, tokens of that app. Read-only tokens too."""
    APP_WRITE = "app:write"
    """Change one app or its machines: as APP_READ, but not read-only tokens."""
    ORG_READ = "org:read"
    """Read org-wide things (lists of apps, the audit log): the operator and org tokens
    (never app tokens); what an org token sees is limited to its org."""
    ORG_WRITE = "org:write"
    """Create in an org (apps): the operator and org tokens that are not read-only."""
    OPERATOR = "operator"
    """Hosts, quarantine, orgs, tokens: the operator only."""

    @property
    def writes(self) -> bool:
        return self in (Scope.APP_WRITE, Scope.ORG_WRITE, Scope.OPERATOR)

    @property
    def on_app(self) -> bool:
        return self in (Scope.APP_READ, Scope.APP_WRITE)


Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def requires(scope: Scope) -> Callable[[Endpoint], Endpoint]:
    """Declare the scope a route's endpoint needs."""

    def declare(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, SCOPE_ATTRIBUTE, scope)
        return endpoint

    return declare


def declared_scope(endpoint: object) -> Scope | None:
    scope = getattr(endpoint, SCOPE_ATTRIBUTE, None)
    return scope if isinstance(scope, Scope) else None
