"""This host's small shared resources: loopback ports for the servers hangar starts for tests
and benchmarks, and short state folders under ``/run`` for what holds unix sockets."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path


def short_state_dir(base: Path, owner: Path, prefix: str = "") -> Path:
    """A folder under ``base`` for the state of ``owner`` (a hangar home's folder): short,
    since unix socket paths are limited to 107 bytes, and distinct per owner folder."""
    digest = hashlib.sha256(str(owner.resolve()).encode()).hexdigest()[:12]
    return base / f"{prefix}{digest}"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
