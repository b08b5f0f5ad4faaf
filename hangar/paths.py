"""Where hangar keeps its state on a host."""

from __future__ import annotations

import os
from pathlib import Path


def hangar_home() -> Path:
    """``$HANGAR_HOME``, default ``~/.local/share/hangar``."""
    configured = os.environ.get("HANGAR_HOME")
    if configured:
        return Path(configured)
    return Path.home() / ".local" / "share" / "hangar"


def cache_dir() -> Path:
    """Shared caches (kernels, image rootfs). ``$HANGAR_CACHE``, default ``$HANGAR_HOME/cache``."""
    configured = os.environ.get("HANGAR_CACHE")
    if configured:
        return Path(configured)
    return hangar_home() / "cache"
