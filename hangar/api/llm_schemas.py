"""Request and answer shapes of ``/v1/orgs/{org_slug}/llm/deployments``."""

from __future__ import annotations

from pydantic import BaseModel

from hangar.model.llm import Engine, TokenTotals


class ReplicaView(BaseModel):
    id: str
    state: str
    region: str
    host: str
    private_ip: str


class DeploymentView(BaseModel):
    id: str
    name: str
    org: str
    app: str
    model: str
    engine: Engine
    image: str
    cpus: int
    memory_mb: int
    min_replicas: int
    max_replicas: int
    region: str
    created_at: str
    replicas: list[ReplicaView]
    usage: TokenTotals


class ApiKeyCreated(BaseModel):
    id: str
    deployment: str
    key: str
    """The secret, shown this once (hangar keeps only its hash)."""
