"""Suite-wide settings: one shared cache (guest kernel, image rootfs) for every test run."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HANGAR_CACHE", str(REPO_ROOT / ".cache"))
