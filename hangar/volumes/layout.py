"""Where volumes live on a host: one folder (``$HANGAR_HOME/volumes`` by default) holding

- ``images/VOLUME_ID.qcow2``: the volume's disk image (snapshots are inside it);
- ``images/VOLUME_ID.qcow2.partial``: an image being written, renamed into place when whole;
- ``keys/VOLUME_ID.key``: an encrypted volume's key, wrapped by the host key;
- ``host.key``: the host key (unless the operator keeps it elsewhere);
- ``run/``: short-lived secret files handed to ``qemu-img`` and QEMU, removed after use.

Every folder is 0700: only hangar reads images and keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hangar.volumes.model import check_volume_id

IMAGE_SUFFIX = ".qcow2"
PARTIAL_SUFFIX = ".partial"
KEY_SUFFIX = ".key"
PRIVATE_DIR_MODE = 0o700


@dataclass(frozen=True)
class VolumeLayout:
    root: Path

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def default_host_key(self) -> Path:
        return self.root / "host.key"

    def image(self, volume_id: str) -> Path:
        return self.images_dir / f"{check_volume_id(volume_id)}{IMAGE_SUFFIX}"

    def partial_image(self, volume_id: str) -> Path:
        image = self.image(volume_id)
        return image.with_name(image.name + PARTIAL_SUFFIX)

    def key(self, volume_id: str) -> Path:
        return self.keys_dir / f"{check_volume_id(volume_id)}{KEY_SUFFIX}"

    def ensure_dirs(self) -> None:
        for folder in (self.root, self.images_dir, self.keys_dir, self.run_dir):
            folder.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            os.chmod(folder, PRIVATE_DIR_MODE)
