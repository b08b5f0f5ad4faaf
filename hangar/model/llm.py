"""Model deployments: what ``hangar llm deploy`` records, and the tokens their requests used.

A deployment serves one model under a name (what clients send as ``model``) within an org.
Its replicas are ordinary machines of the deployment's app, marked with
``REPLICA_METADATA``. The weights come from a file on the server's host (packed into the
deployment's image) or from a volume (each replica mounts its own copy made from a snapshot).
"""

from __future__ import annotations

import re
import secrets
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hangar.errors import InvalidRequest

REPLICA_METADATA = "hangar_llm_deployment"
"""Machine metadata naming the deployment (its id) a machine is a replica of."""
DEPLOYMENT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
VOLUME_PREFIX = "vol:"
DEFAULT_MODEL_FILE = "model.gguf"
MAX_REPLICAS = 16
ENGINE_PORT = 8080
MODELS_DIR = "/models"


class Engine(StrEnum):
    LLAMA_CPP = "llama.cpp"
    IMAGE = "image"  # an OpenAI-compatible server image the operator's registry holds


class ModelSource(BaseModel):
    """Where the weights are: a file on the server's host, or ``FILE`` on volume ``VOLUME``."""

    model_config = ConfigDict(frozen=True)

    path: str = ""
    volume: str = ""
    file: str = DEFAULT_MODEL_FILE

    @classmethod
    def parse(cls, text: str) -> ModelSource:
        """``PATH`` or ``vol:VOLUME[:FILE]``."""
        if text.startswith(VOLUME_PREFIX):
            volume, _, file = text.removeprefix(VOLUME_PREFIX).partition(":")
            if not volume:
                raise InvalidRequest("model: vol: needs a volume name or id", field="model")
            return cls(volume=volume, file=file or DEFAULT_MODEL_FILE)
        if not text.startswith("/"):
            raise InvalidRequest(
                "model: a path on the server's host must be absolute", field="model"
            )
        return cls(path=text, file=text.rsplit("/", 1)[-1])

    @field_validator("file")
    @classmethod
    def _plain_file(cls, value: str) -> str:
        if not value or "/" in value or value in (".", ".."):
            raise ValueError("the model file is a plain file name")
        return value

    def __str__(self) -> str:
        if self.volume:
            return f"{VOLUME_PREFIX}{self.volume}:{self.file}"
        return self.path


class DeploymentSpec(BaseModel):
    """What ``POST /v1/llm/deployments`` takes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    app_name: str | None = None  # default: ``llm-NAME``
    model: str
    engine: Engine = Engine.LLAMA_CPP
    image: str | None = None  # with engine=image
    port: Annotated[int, Field(ge=1, le=65535)] = ENGINE_PORT
    cpus: Annotated[int, Field(ge=1, le=64)] = 1
    memory_mb: Annotated[int, Field(ge=128, le=1024 * 1024)] = 512
    gpu_kind: str | None = None
    gpus: Annotated[int, Field(ge=1, le=8)] | None = None
    min_replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = 0
    max_replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 1
    concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    context: Annotated[int, Field(ge=64, le=131072)] = 2048
    region: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not DEPLOYMENT_NAME.match(value):
            raise ValueError("lowercase letters, digits, '.', '_' and '-', at most 63")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        if (self.gpu_kind is None) != (self.gpus is None):
            raise ValueError("gpu_kind and gpus are given together")
        if (self.engine is Engine.IMAGE) != (self.image is not None):
            raise ValueError("image is given exactly when engine is 'image'")
        return self


class Deployment(BaseModel):
    """A recorded deployment."""

    model_config = ConfigDict(frozen=True)

    id: str
    org: str
    name: str
    app: str
    model: ModelSource
    engine: Engine
    image: str  # the image replicas run (the engine image built for it, or the given one)
    port: int
    cpus: int
    memory_mb: int
    gpu_kind: str | None = None
    gpus: int | None = None
    min_replicas: int
    max_replicas: int
    concurrency: int
    context: int
    region: str
    volume: str = ""  # with a volume model: the volume's id
    snapshot: str = ""  # with a volume model: the snapshot each replica's copy is made from
    created_at: float


class ApiKey(BaseModel):
    """A per-deployment API key; its secret is stored only as a hash."""

    model_config = ConfigDict(frozen=True)

    id: str
    org: str
    deployment: str
    created_at: float
    revoked_at: float | None = None


class TokenUsage(BaseModel):
    """Tokens one request through the gateway used."""

    model_config = ConfigDict(frozen=True)

    org: str
    deployment: str
    token_id: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    at: float


class TokenTotals(BaseModel):
    model_config = ConfigDict(frozen=True)

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def new_deployment_id() -> str:
    return "dep_" + secrets.token_hex(6)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


class ScaleSpec(BaseModel):
    """What ``POST .../scale`` takes: new bounds (an absent one stays as it is)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] | None = None
    max_replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] | None = None
