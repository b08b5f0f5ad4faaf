"""The API's route table, flat: each operation's path, methods, name and declared scope.

The request guard matches requests against it before FastAPI does, the OpenAPI document
is annotated from it, and the isolation matrix test is generated from it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import routing
from starlette.convertors import Convertor
from starlette.routing import BaseRoute, compile_path

from hangar.api.scopes import Scope, declared_scope


@dataclass(frozen=True)
class ApiOperation:
    path: str
    methods: frozenset[str]
    name: str
    endpoint: Callable[..., Any]
    regex: re.Pattern[str]
    convertors: dict[str, Convertor[Any]]

    @property
    def scope(self) -> Scope | None:
        return declared_scope(self.endpoint)

    def match(self, path: str) -> dict[str, Any] | None:
        found = self.regex.match(path)
        if found is None:
            return None
        return {
            name: self.convertors[name].convert(value) for name, value in found.groupdict().items()
        }


def _api_routes(routes: Sequence[BaseRoute]) -> Iterator[Any]:
    """The APIRoutes under ``routes``, through included routers (FastAPI >= 0.160 keeps an
    included router as one entry; earlier versions copy its routes in)."""
    iterate: Callable[[Sequence[BaseRoute]], Iterable[Any]] | None = getattr(
        routing, "iter_route_contexts", None
    )
    if iterate is None:
        yield from (route for route in routes if isinstance(route, routing.APIRoute))
        return
    for context in iterate(routes):
        if isinstance(context.original_route, routing.APIRoute):
            yield context


def api_operations(routes: Sequence[BaseRoute]) -> list[ApiOperation]:
    operations = []
    for route in _api_routes(routes):
        regex, _format, convertors = compile_path(route.path)
        operations.append(
            ApiOperation(
                path=route.path,
                methods=frozenset(route.methods or ()),
                name=route.name,
                endpoint=route.endpoint,
                regex=regex,
                convertors=convertors,
            )
        )
    return operations


class RouteTable:
    """Built on first use, once every router has been included."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self._routes = routes
        self._operations: list[ApiOperation] | None = None

    @property
    def operations(self) -> list[ApiOperation]:
        if self._operations is None:
            self._operations = api_operations(self._routes)
        return self._operations

    def match(self, method: str, path: str) -> tuple[ApiOperation, dict[str, Any]] | None:
        for operation in self.operations:
            if method not in operation.methods:
                continue
            params = operation.match(path)
            if params is not None:
                return operation, params
        return None
