"""The parts of an OCI image config that decide how the guest runs the image's process."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict


class ImageConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    entrypoint: list[str] = []
    cmd: list[str] = []
    env: dict[str, str] = {}
    workdir: str = ""
    user: str = ""

    @classmethod
    def from_oci(cls, image_config: Mapping[str, Any]) -> ImageConfig:
        """Read an OCI image config blob (``application/vnd.oci.image.config.v1+json``)."""
        config = image_config.get("config") or {}
        env: dict[str, str] = {}
        for entry in config.get("Env") or []:
            key, _, value = str(entry).partition("=")
            env[key] = value
        return cls(
            entrypoint=[str(word) for word in config.get("Entrypoint") or []],
            cmd=[str(word) for word in config.get("Cmd") or []],
            env=env,
            workdir=str(config.get("WorkingDir") or ""),
            user=str(config.get("User") or ""),
        )
