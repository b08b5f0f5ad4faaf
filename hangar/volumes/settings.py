"""The operator's volume settings, read once from the environment.

- ``HANGAR_VOLUMES_DIR``: where volume images and keys live (default ``$HANGAR_HOME/volumes``);
- ``HANGAR_VOLUME_HOST_KEY``: the host key file wrapping volume keys (default ``DIR/host.key``);
- ``HANGAR_VOLUME_RESERVE_GB``: free space volumes never take (default 1): a create or extend
  that would cut into it gets a 422;
- ``HANGAR_VOLUME_ORPHAN_GRACE_S``: age at which an image or key that no record names is
  removed (default 3600).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hangar.errors import InvalidRequest
from hangar.volumes.layout import default_volumes_root
from hangar.volumes.model import GIB

DIR_ENV = "HANGAR_VOLUMES_DIR"
HOST_KEY_ENV = "HANGAR_VOLUME_HOST_KEY"
RESERVE_ENV = "HANGAR_VOLUME_RESERVE_GB"
GRACE_ENV = "HANGAR_VOLUME_ORPHAN_GRACE_S"
DEFAULT_RESERVE_BYTES = GIB
DEFAULT_ORPHAN_GRACE_S = 3600.0


@dataclass(frozen=True)
class VolumeSettings:
    root: Path
    host_key_file: Path | None = None
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    orphan_grace_s: float = DEFAULT_ORPHAN_GRACE_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> VolumeSettings:
        root = Path(environ[DIR_ENV]) if environ.get(DIR_ENV) else default_volumes_root()
        host_key = Path(environ[HOST_KEY_ENV]) if environ.get(HOST_KEY_ENV) else None
        return cls(
            root=root,
            host_key_file=host_key,
            reserve_bytes=int(_number(environ, RESERVE_ENV, DEFAULT_RESERVE_BYTES / GIB) * GIB),
            orphan_grace_s=_number(environ, GRACE_ENV, DEFAULT_ORPHAN_GRACE_S),
        )


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name}={raw!r} is not a number", setting=name) from None
    if value < 0:
        raise InvalidRequest(f"{name} must not be negative", setting=name)
    return value
