"""The operator's volume settings, as :mod:`hangar.settings` reads them once.

- ``HANGAR_VOLUMES_DIR``: where volume images and keys live (default ``$HANGAR_HOME/volumes``);
- ``HANGAR_VOLUME_HOST_KEY``: the host key file wrapping volume keys (default ``DIR/host.key``);
- ``HANGAR_VOLUME_RESERVE_GB``: free space volumes never take (default 1): a create or extend
  that would cut into it gets a 422;
- ``HANGAR_VOLUME_ORPHAN_GRACE_S``: age at which an image or key that no record names is
  removed (default 3600).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hangar.settings import Settings
from hangar.volumes.model import GIB

DEFAULT_RESERVE_BYTES = GIB
DEFAULT_ORPHAN_GRACE_S = 3600.0


@dataclass(frozen=True)
class VolumeSettings:
    root: Path
    host_key_file: Path | None = None
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    orphan_grace_s: float = DEFAULT_ORPHAN_GRACE_S

    @classmethod
    def from_settings(cls, settings: Settings) -> VolumeSettings:
        return cls(
            root=settings.volumes_root,
            host_key_file=settings.volume_host_key,
            reserve_bytes=int(settings.volume_reserve_gb * GIB),
            orphan_grace_s=settings.volume_orphan_grace_s,
        )
