"""``/metrics``: the server's metrics in Prometheus' text format, for the operator."""

from __future__ import annotations

from fastapi import APIRouter, Response

from hangar.api.deps import ServicesDep
from hangar.api.scopes import Scope, requires
from hangar.metrics.registry import CONTENT_TYPE

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format"}},
)
@requires(Scope.OPERATOR)
async def metrics(services: ServicesDep) -> Response:
    """Every metric of this server (scrape with the operator token as a bearer token)."""
    return Response(services.metrics.exposition(), media_type=CONTENT_TYPE)
