"""Sweep the volumes folder: images and keys that no record names go, after a grace period.

The grace period (its age read from the file's modification time against the injected clock)
covers a create whose record is being written while its first file appears. A file whose
volume id is in ``owned`` is never touched, however old or partial; passphrase files a crash
left in the private ``run`` folder go once past the grace period whoever they were for.
Names hangar does not make are left alone.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from hangar.clock import Clock
from hangar.volumes.layout import (
    IMAGE_SUFFIX,
    KEY_SUFFIX,
    PARTIAL_SUFFIX,
    VolumeLayout,
)
from hangar.volumes.model import VOLUME_ID_PATTERN


@dataclass
class ReconcileReport:
    removed: list[Path] = field(default_factory=list)
    waiting: list[Path] = field(default_factory=list)
    """Orphans still inside their grace period."""
    kept: list[Path] = field(default_factory=list)
    """Files of owned volumes."""


def volume_id_of(name: str) -> str | None:
    """The volume a file in ``images/`` or ``keys/`` belongs to, from its name."""
    base = name.removesuffix(PARTIAL_SUFFIX)
    for suffix in (IMAGE_SUFFIX, KEY_SUFFIX):
        if base.endswith(suffix):
            candidate = base.removesuffix(suffix)
            return candidate if VOLUME_ID_PATTERN.fullmatch(candidate) else None
    return None


def reconcile_volume_files(
    layout: VolumeLayout, owned: Collection[str], clock: Clock, grace_s: float
) -> ReconcileReport:
    report = ReconcileReport()
    now = clock.now()

    def old_enough(path: Path) -> bool:
        try:
            return now - path.stat().st_mtime >= grace_s
        except FileNotFoundError:
            return False

    for folder in (layout.images_dir, layout.keys_dir):
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            volume_id = volume_id_of(path.name)
            if volume_id is None or not path.is_file():
                continue
            if volume_id in owned:
                report.kept.append(path)
            elif old_enough(path):
                path.unlink(missing_ok=True)
                report.removed.append(path)
            else:
                report.waiting.append(path)
    run_dir = layout.run_dir
    for path in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if path.is_file() and old_enough(path):
            os.unlink(path)
            report.removed.append(path)
    return report
