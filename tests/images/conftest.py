"""Shared, expensive artefacts for the images tests: a busybox image pushed to the suite's
loopback registry (the ``registry`` fixture of tests/conftest.py), the image cached as an
ext4 rootfs, the guest kernel and its base initramfs."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from hangar.images.build import build_busybox_image
from hangar.images.initramfs import ensure_base_initramfs
from hangar.images.kernel import GuestKernel, ensure_kernel
from hangar.images.netpolicy import RegistryPolicy
from hangar.images.reference import ImageRef, parse_image_ref
from hangar.images.rootfs import CachedImage, ImageCache
from tests.conftest import SUITE_CACHE

HELLO_CMD = ["sh", "-c", "echo hello; exit 3"]
HELLO_ENV = {"PATH": "/usr/bin:/bin", "GREETING": "hi there"}


@dataclass(frozen=True)
class PushedImage:
    ref: ImageRef
    digest: str


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout holding tag ``hello``: busybox, cmd ``echo hello; exit 3``."""
    layout = tmp_path_factory.mktemp("layout") / "oci"
    build_busybox_image(layout, "hello", HELLO_CMD, HELLO_ENV)
    return layout


def push(layout: Path, tag: str, registry: str, name: str) -> PushedImage:
    digest_file = layout.parent / f"{tag}.digest"
    subprocess.run(
        [
            "skopeo", "copy", "--quiet", "--dest-tls-verify=false",
            "--digestfile", str(digest_file),
            f"oci:{layout}:{tag}", f"docker://{registry}/{name}",
        ],
        check=True,
    )  # fmt: skip
    return PushedImage(ref=parse_image_ref(f"{registry}/{name}"), digest=digest_file.read_text())


@pytest.fixture(scope="session")
def pushed_hello(busybox_layout: Path, registry: str) -> PushedImage:
    return push(busybox_layout, "hello", registry, "hangar/hello:latest")


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def suite_policy(registry: str) -> RegistryPolicy:
    """The suite's registry is on loopback: allowed explicitly, spoken to over plain HTTP."""
    return RegistryPolicy(local=frozenset({registry}), insecure=frozenset({registry}))


@pytest.fixture(scope="session")
def cached_hello(pushed_hello: PushedImage, session_cache_dir: Path, registry: str) -> CachedImage:
    cache = ImageCache(session_cache_dir, policy=suite_policy(registry))
    return asyncio.run(cache.ensure(pushed_hello.ref))


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    """The real guest kernel, fetched once into the suite's shared cache (``HANGAR_CACHE``)."""
    return ensure_kernel(SUITE_CACHE)


@pytest.fixture(scope="session")
def base_initrd(guest_kernel: GuestKernel) -> Path:
    return ensure_base_initramfs(guest_kernel, SUITE_CACHE)
